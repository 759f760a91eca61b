"""Gemma-2's soft-capping divides by its caps: a file with a cap <= 0 is refused at load
(the reference would compute NaN logits from it without a word)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "record"))

import models

from pymem.errors import ConfigError
from pymem.runtime.gguf_llama import GGUFModel


@pytest.mark.parametrize("key", ["attn_logit_softcapping", "final_logit_softcapping"])
@pytest.mark.parametrize("cap", [0.0, -1.0])
def test_gemma2_cap_must_be_positive(tmp_path, monkeypatch, key: str, cap: float) -> None:
    f32 = models._Model.f32

    def patched(self, name: str, value: float) -> None:
        f32(self, name, cap if name == key else value)

    monkeypatch.setattr(models._Model, "f32", patched)
    path = models.write_gemma2(tmp_path / "gemma2.gguf")
    with pytest.raises(ConfigError, match=rf"gemma2\.{key} = {cap}.*must be > 0"):
        GGUFModel(path)


def test_gemma2_default_caps_load(tmp_path) -> None:
    model = GGUFModel(models.write_gemma2(tmp_path / "gemma2.gguf"))
    assert model.hp.f_attn_logit_softcapping == 50.0
    assert model.hp.f_final_logit_softcapping == 30.0
    model.close()
