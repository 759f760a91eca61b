"""The GGUF engine's weights keep their file's type (F32, q8_0, q4_K) and bytes.

The recorded q8_0 / q4_K runs (tests/data/runs/llama-q*.json) check that the engine
decodes them as llama.cpp does; here: which types land in the store, that the bytes are the
file's, and that a type unknown to the bound ggml is refused naming the tensor.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest

from pymem.backend import get_device
from pymem.errors import UnsupportedError
from pymem.runtime.gguf_llama import GGUFWeights

MODELS = Path(__file__).resolve().parent / "data" / "models"


@pytest.mark.parametrize(
    ("name", "quant"), [("tiny-llama-q8_0.gguf", "q8_0"), ("tiny-llama-q4_K.gguf", "q4_K")]
)
def test_quantised_weights_keep_type_and_bytes(name: str, quant: str) -> None:
    path = MODELS / name
    reader = gguf.GGUFReader(path)
    weights = GGUFWeights(path, get_device("cpu"), reader)
    try:
        assert weights.types["blk.0.attn_q.weight"] == quant
        assert weights.types["blk.1.ffn_down.weight"] == quant
        assert weights.types["blk.0.attn_norm.weight"] == "f32"
        t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
        stored = weights.store["blk.1.ffn_down.weight"].read_bytes()
        assert bytes(stored) == np.ascontiguousarray(t.data).tobytes()
    finally:
        weights.close()


class _OddType(int):
    name = "TYPE_99"


def test_unknown_weight_type_is_refused_naming_the_tensor() -> None:
    fake = SimpleNamespace(
        tensors=[
            SimpleNamespace(
                name="blk.0.odd.weight",
                tensor_type=_OddType(99),
                shape=[32],
                data=np.zeros(32, np.uint8),
            )
        ]
    )
    with pytest.raises(UnsupportedError, match=r"blk\.0\.odd\.weight.*TYPE_99"):
        GGUFWeights("odd.gguf", get_device("cpu"), fake)
