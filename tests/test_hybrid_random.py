"""Seeded random walks over hybrid and hybrid-iSWA memories.

Every step is a random decode (several sequences, prompts or single tokens, sometimes a
deliberately invalid or oversized batch), a sequence op, a per-sequence or whole save /
restore, a truncated restore, or a clear. After every step the composition rules and the
recurrent part's invariants are checked, the KV parts' (slow, loop-based) every 10 steps.
Every operation that reports failure (decode 1 / -1, seq_rm False, a refused restore)
must leave the whole state bytes as they were; every successful restore of a just-saved
blob must reproduce that blob.
"""

from __future__ import annotations

import numpy as np
import pytest
from hybrid_helpers import check_hybrid
from state_files import check_seq_writer
from test_hybrid import make_hybrid
from test_iswa import decode, randomize

from pymem.errors import StateError
from pymem.hybrid import HybridMemory
from pymem.memory import MemoryStatus

N_SEQ = 4


def _next_pos(mem: HybridMemory, s: int) -> int:
    return mem.seq_pos_max(s) + 1


def _walk(mem: HybridMemory, rng: np.random.Generator, n_steps: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for step in range(n_steps):
        op = rng.choice(["decode", "decode", "decode", "seq_rm", "seq_cp", "seq_keep", "seq_add", "seq_div",
                         "save_restore", "bad_restore", "whole", "clear"],
                        p=[.2, .15, .15, .12, .06, .03, .06, .04, .08, .05, .04, .02])  # fmt: skip
        op = str(op)
        counts[op] = counts.get(op, 0) + 1
        if op == "decode":
            # a decode applies pending K-shifts / stream copies first, even when it then
            # fails (as the reference): do that here so "unchanged" means the batch part
            upd = mem.init_update()
            if upd.get_status() == MemoryStatus.SUCCESS:
                upd.apply()
        before = mem.state_write()
        if op == "decode":
            seqs = rng.choice(N_SEQ, size=int(rng.integers(1, N_SEQ + 1)), replace=False)
            items = []
            for s in sorted(int(x) for x in seqs):
                n = int(rng.integers(1, 12))
                p0 = _next_pos(mem, s)
                if rng.random() < 0.05:
                    p0 += 2  # a position gap: the batch is invalid
                items += [[int(rng.integers(0, 60)), p0 + i, [s], i == n - 1] for i in range(n)]
            rng.shuffle(items)  # interleaved; positions stay increasing per sequence after a sort
            items.sort(key=lambda it: (it[2][0], it[1]))
            res = decode(mem, items, n_ubatch=int(rng.choice([4, 8, 32])))
            if res != 0:
                assert mem.state_write() == before, f"decode {res} changed the memory"
        elif op == "seq_rm":
            s = int(rng.integers(-1, N_SEQ))
            p0 = int(rng.integers(-1, 30))
            p1 = int(rng.integers(-1, 40))
            if not mem.seq_rm(s, p0, p1):
                assert mem.state_write() == before, "a refused seq_rm changed the memory"
        elif op == "seq_cp":
            a, b = (int(x) for x in rng.choice(N_SEQ, 2, replace=False))
            mem.seq_cp(a, b)
        elif op == "seq_keep":
            mem.seq_keep(int(rng.integers(0, N_SEQ)))
        elif op == "seq_add":
            mem.seq_add(
                int(rng.integers(0, N_SEQ)), int(rng.integers(-1, 10)), -1, int(rng.integers(-5, 6))
            )
        elif op == "seq_div":
            mem.seq_div(
                int(rng.integers(0, N_SEQ)), int(rng.integers(-1, 10)), -1, int(rng.integers(1, 4))
            )
        elif op == "save_restore":
            a, b = (int(x) for x in rng.integers(0, N_SEQ, 2))
            blob = mem.state_write(a)
            try:
                mem.state_read(blob, b)
            except StateError:
                assert mem.state_write() == before  # e.g. no room for the cells in b's stream
            else:
                if a == b:
                    assert mem.state_write(b) == blob
        elif op == "bad_restore":
            s = int(rng.integers(0, N_SEQ))
            blob = mem.state_write(s)
            cut = int(rng.integers(0, len(blob)))
            with pytest.raises(StateError):
                mem.state_read(blob[:cut], int(rng.integers(0, N_SEQ)))
            assert mem.state_write() == before, "a refused restore changed the memory"
        elif op == "whole":
            mem.clear(bool(rng.integers(0, 2)))
            assert mem.state_read(before) == len(before)
            assert mem.state_write() == before
        else:
            mem.clear(True)
        check_hybrid(mem, N_SEQ, kv_loops=step % 10 == 9)
        # the sized one-sequence writer against the general one, both flag sets
        counts["sized writer"] = counts.get("sized writer", 0) + check_seq_writer(
            mem, int(rng.integers(0, N_SEQ)), int(rng.choice([0, 1]))
        )
    return counts


@pytest.mark.parametrize("pattern", ["RAR", "RSAR"])
@pytest.mark.parametrize("unified", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_walk(pattern: str, unified: bool, seed: int) -> None:
    rng = np.random.default_rng(seed * 7 + len(pattern) + unified)
    mem = make_hybrid(pattern, kv_size=64, n_seq_max=N_SEQ, unified=unified, n_ubatch=4)
    randomize(mem, seed)
    counts = _walk(mem, rng, 150)
    assert counts.get("decode", 0) > 30 and counts.get("bad_restore", 0) > 2
    assert counts["sized writer"] > 100  # the comparisons were not the general writer's alone
    mem.close()


@pytest.mark.parametrize("pattern", ["RAR", "RSAR"])
def test_sized_writer_covers_every_part(pattern: str) -> None:
    # every part (KV cache, sliding-window cache, recurrent memory) sizes its part: one
    # pass for the whole blob (the walk above checks it gives the general writer's bytes)
    mem = make_hybrid(pattern, kv_size=64, n_seq_max=N_SEQ, unified=True, n_ubatch=4)
    decode(mem, [[1, p, [0], p == 4] for p in range(5)], n_ubatch=4)
    one = mem.seq_writer(0, 0)
    assert one is not None and one[0] == len(mem.state_write(0))
    assert mem.mem_attn.seq_writer(0, 0) is not None and mem.mem_recr.seq_writer(0, 0) is not None
    mem.close()
