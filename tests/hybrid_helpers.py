"""The hybrid memories' invariant checker, shared by the hybrid tests."""

from __future__ import annotations

from kv_helpers import check_invariants as check_kv
from recurrent_helpers import check_invariants as check_recr

from pymem.hybrid import HybridMemory
from pymem.kv import KVCache


def kv_parts(mem: HybridMemory) -> list[KVCache]:
    """The KV caches of a hybrid: its attention cache, or an iSWA part's base and SWA caches."""
    return [p for p in mem.parts().values() if isinstance(p, KVCache)]


def check_hybrid(mem: HybridMemory, n_seq: int | None = None, *, kv_loops: bool = True) -> None:
    """Every part's invariants, and the composition's position rules over them.

    ``seq_pos_min`` is the larger of the attention part's (the SWA cache's for an iSWA
    part) and the recurrent part's, ``seq_pos_max`` the smaller; the recurrent part holds
    one position per sequence. ``kv_loops=False`` skips the KV parts' loop-based checker
    (slow: every cell x every sequence id); the composition rules and the recurrent checks
    still run.
    """
    if kv_loops:
        for kv in kv_parts(mem):
            check_kv(kv)
    check_recr(mem.mem_recr)
    for s in range(n_seq if n_seq is not None else mem.n_seq_max):
        r = mem.seq_pos_ranges(s)
        attn = r["swa"] if mem.is_iswa else r["attention"]
        assert mem.seq_pos_min(s) == max(attn[0], r["recurrent"][0]), f"seq {s}: pos_min"
        assert mem.seq_pos_max(s) == min(attn[1], r["recurrent"][1]), f"seq {s}: pos_max"
        assert r["recurrent"][0] == r["recurrent"][1], f"seq {s}: one recurrent position"
