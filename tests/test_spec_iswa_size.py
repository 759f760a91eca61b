"""The iSWA SWA-cache size: the spec's formula (llama_kv_cache_iswa's constructor) against
pymem's ``swa_cache_size`` and the size the ``KVCacheISWA`` constructor really allocates.

``size_swa = PAD(min(kv_size, n_swa * (unified ? n_seq_max : 1) + n_ubatch), 256)``, or
``kv_size`` with ``swa_full``. Note that the padding can make the SWA cache larger than
the base cache for tiny contexts (kv_size 16 -> 256 SWA cells), as in the reference.
"""

from __future__ import annotations

import itertools

from spec.memory import iswa_size_swa

from pymem.kv.iswa import KVCacheISWA, swa_cache_size
from pymem.spec import LayerSpec, ModelSpec, RopeSpec, RopeType, SWAType


def test_swa_size_formula_matches_on_a_grid() -> None:
    n = 0
    for kv_size, n_swa, n_seq, n_ubatch, unified, full in itertools.product(
        [16, 256, 1000, 4096, 32768],
        [1, 128, 512, 4096],
        [1, 3, 4, 64],
        [1, 512, 2048],
        [True, False],
        [True, False],
    ):
        want = iswa_size_swa(kv_size, n_swa, n_seq, n_ubatch, unified, full)
        assert swa_cache_size(kv_size, n_swa, unified, n_seq, n_ubatch, full) == want
        n += 1
    assert n == 960
    assert iswa_size_swa(16, 4, 1, 8, True, False) == 256  # larger than the base cache


def test_constructed_iswa_cache_has_the_formula_size() -> None:
    rope = RopeSpec(n_rot=8, rope_type=RopeType.NONE)
    spec = ModelSpec(
        layers=(
            LayerSpec.attention(1, 8, rope=rope),
            LayerSpec.attention(1, 8, swa=True, rope=rope),
        ),
        n_swa=100,
        swa_type=SWAType.STANDARD,
        arch="spec",
    )
    for kv_size, n_seq, unified, n_ubatch, full in [
        (1024, 4, True, 64, False),
        (1024, 4, False, 64, False),
        (256, 2, True, 512, False),
        (512, 1, True, 8, True),
    ]:
        mem = KVCacheISWA(
            spec,
            kv_size=kv_size,
            n_seq_max=n_seq,
            unified=unified,
            n_ubatch=n_ubatch,
            swa_full=full,
        )
        try:
            assert mem.kv_base.get_size() == kv_size
            assert mem.kv_swa.get_size() == iswa_size_swa(
                kv_size, 100, n_seq, n_ubatch, unified, full
            )
        finally:
            mem.close()
