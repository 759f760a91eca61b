"""The recorded run llama.main.fa0.u1 on a KVCache built by hand: the K-shift's bytes.

tests/test_replay_runs.py replays every recorded run through the factory's memory
(results, positions, sizes and blobs after each step, failed restores re-enacted). Here
the run is replayed on a :class:`~pymem.kv.KVCache` built from a hand-written spec, with
the graph's part played for the cells each ubatch wrote only (tests/written_rows.py) and
the cache's invariant checker after every step. What this file adds:

* The decodes right after ``seq_add`` (step 9) and ``seq_div`` (step 11) apply a pending
  K-shift. The K rows of the cells it rotated are compared with the reference's before
  the replay takes the reference's: with RoPE, pymem's K-shift graph reproduces
  llama.cpp's bytes exactly after ``seq_add``; after ``seq_div`` it rotates the other way
  (the reference rotates by old - new), and matches once that sign is re-enacted. Without
  RoPE the shift is metadata only and leaves K as it was.
* Every recorded per-sequence blob restores into an empty cache and writes back equal.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from kv_helpers import check_invariants, fill_rows_from_part, parse_kv_part, tiny_llama_spec
from replay import DATA, Run, strip_seq, strip_whole
from written_rows import WrittenRows, replay_written

from pymem.kv import KVCache
from pymem.memory import Memory
from pymem.spec import LayerSpec, ModelSpec, RopeSpec, RopeType

RUN = DATA / "runs" / "llama.main.fa0.u1.json"


def make_cache(run: Run, rope: bool) -> KVCache:
    mem = run.data["memory"]
    spec = tiny_llama_spec()
    if not rope:
        none = RopeSpec(n_rot=32, rope_type=RopeType.NONE)
        spec = ModelSpec(layers=(LayerSpec.attention(1, 32, rope=none),) * 2, arch="llama")
    return KVCache(
        spec,
        type_k=mem["type_k"],
        type_v=mem["type_v"],
        v_trans=mem["v_trans"],
        unified=mem["kv_unified"],
        kv_size=mem["n_ctx_seq"],
        n_seq_max=mem["n_seq_max"],
        n_pad=mem["parts"][0]["n_pad"],
    )


class KShiftLog(WrittenRows):
    """:class:`WrittenRows` that also logs the K rows of the cells a decode's K-shift
    rotated, ``(step, layer, cells, K before, pymem's K after, the reference's K)``, then
    takes the reference's rows for those cells. ``div_sign_as_reference``: after each
    ``seq_div`` the pending shift is negated (the reference records old - new)."""

    def __init__(self, run: Run, kv: KVCache, div_sign_as_reference: bool) -> None:
        super().__init__(run, check_invariants)  # type: ignore[arg-type]
        assert kv.n_stream == 1
        self.kv = kv
        self.div_sign_as_reference = div_sign_as_reference
        self.shifted = np.zeros(0, dtype=np.int64)
        self.k_before: list[np.ndarray] = []
        self.log: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def k_rows(self, cells: np.ndarray) -> list[np.ndarray]:
        return [layer.k.read_rows(cells) for layer in self.kv.layers]

    def before_op(self, step: dict[str, Any], mem: Memory, where: str) -> None:
        super().before_op(step, mem, where)
        if step["op"] == "seq_div":
            assert not self.kv.get_has_shift(), f"{where}: a shift is already pending"
        if step["op"] == "decode":
            c = self.kv.v_cells[0]
            self.shifted = np.flatnonzero((c.pos >= 0) & (c.shift != 0))
            self.k_before = self.k_rows(self.shifted)

    def after_op(self, step: dict[str, Any], mem: Memory, result: Any, where: str) -> None:
        if step["op"] == "seq_div" and self.div_sign_as_reference:
            for cells in self.kv.v_cells:
                cells.shift[:] = -cells.shift
        if step["op"] == "decode" and result == 0 and self.shifted.size:
            ref = parse_kv_part(strip_whole(self.run.blob(step["state"]), self.run.arch), 2)
            nonempty = np.flatnonzero(self.kv.v_cells[0].pos >= 0)
            ranks = np.searchsorted(nonempty, self.shifted)
            sp = ref.streams[0]
            for li, (before, after) in enumerate(zip(self.k_before, self.k_rows(self.shifted))):
                _, row, kb = sp.k[li]
                want = np.frombuffer(kb, dtype=np.uint8).reshape(len(sp.cells), row)[ranks]
                self.log.append((step["i"], li, self.shifted, before, after, want))
            fill_rows_from_part(self.kv, ref, 0, self.shifted, ranks)
        super().after_op(step, mem, result, where)


def replay_k_shift(rope: bool, div_sign_as_reference: bool = False) -> list[tuple]:
    run = Run.load(RUN)
    kv = make_cache(run, rope)
    hooks = KShiftLog(run, kv, div_sign_as_reference)
    report = replay_written(run, kv, hooks)
    assert report.steps == report.blobs_compared // 5 == 33
    assert hooks.decodes == 13 and report.failed_restores == hooks.refused == 1
    # the two K-shift decodes: steps 9 (seq_add +5 on seq 2) and 11 (seq_div /2 on seq 3)
    assert sorted({entry[0] for entry in hooks.log}) == [9, 11]
    assert all(entry[2].size > 0 for entry in hooks.log) and len(hooks.log) == 4
    return hooks.log


def test_replay_without_rope_shifts_metadata_only() -> None:
    for _i, _li, _cells, before, after, ref in replay_k_shift(rope=False):
        assert np.array_equal(after, before)  # K as it was ...
        assert not np.array_equal(after, ref)  # ... where the reference rotated it


def test_replay_k_shift_bytes() -> None:
    """pymem's K-shift graph reproduces llama.cpp's rotated K bytes exactly after seq_add;
    after seq_div it rotates the other way (the reference's sign is wrong), and matches
    byte for byte once the reference's sign is emulated."""
    log = replay_k_shift(rope=True)
    assert all(not np.array_equal(after, before) for _i, _li, _c, before, after, _r in log)
    same = {(i, li): np.array_equal(after, ref) for i, li, _c, _b, after, ref in log}
    assert same == {(9, 0): True, (9, 1): True, (11, 0): False, (11, 1): False}
    log = replay_k_shift(rope=True, div_sign_as_reference=True)
    assert all(np.array_equal(after, ref) for _i, _li, _c, _b, after, ref in log)


@pytest.mark.parametrize("seq", [0, 1, 2, 3])
def test_restore_each_recorded_seq_blob_round_trips(seq: int) -> None:
    """Every recorded per-sequence blob restores into an empty cache and writes back equal."""
    run = Run.load(RUN)
    seen = set()
    for step in run.data["steps"]:
        b = step["seq_state"][seq]
        if b in seen:
            continue
        seen.add(b)
        data = strip_seq(run.blob(b))
        kv = make_cache(run, rope=False)
        assert kv.state_read(data, seq) == len(data)
        check_invariants(kv)
        assert bytes(kv.state_write(seq)) == data
        kv.close()
    assert len(seen) > 1
