"""The model writers of tests/record reproduce the committed tiny models byte for byte.

Pins: the recorded runs (tests/data/runs) were made with tests/data/models; a writer
refactor that reorders tensors or RNG draws (the RNG is consumed in writing order) would
silently make record_llama_cpp.py write models the runs were not recorded with. The
quantised llama models are left out: their writer needs llama.cpp's quantiser.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "record"))

import family_attention  # noqa: E402
import family_gemma3n  # noqa: E402
import family_linear  # noqa: E402
import family_moe  # noqa: E402
import family_other  # noqa: E402
import family_ssm  # noqa: E402
import models  # noqa: E402

_MODULES = (models, family_attention, family_moe, family_linear, family_ssm, family_other,
            family_gemma3n)  # fmt: skip
WRITERS = {
    name: writer
    for mod in _MODULES
    for name, writer in mod.MODEL_WRITERS.items()
    if name not in ("tiny-llama-q8_0.gguf", "tiny-llama-q4_K.gguf")
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_writer_reproduces_committed_model(name: str, tmp_path: Path) -> None:
    got = WRITERS[name](tmp_path / name).read_bytes()
    want = (HERE / "data" / "models" / name).read_bytes()
    assert got == want, f"{name}: the writer's {len(got)} bytes differ from the committed file"
