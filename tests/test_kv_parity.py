"""Replay of the recorded llama.cpp run ``llama.main.fa0.u1`` through pymem's KVCache.

Every step is replayed (decodes through the BatchAllocator + init_batch + apply, sequence
ops, restores from the recorded blobs) and compared exactly with the reference: results,
[pos_min, pos_max] of the four sequences, blob sizes, and the per-sequence and whole-state
blobs byte for byte.

K/V bytes were computed by llama.cpp's kernels, so after each decode the rows the ubatch
wrote are filled with the reference's bytes (taken from its whole-state blob of that step,
whose cells are listed in ascending cell order: identical placement tells which row is
which cell). Everything else (placement, restores, blob layout) is pymem's own.

Steps whose K bytes pymem does not reproduce: the decodes right after ``seq_add`` /
``seq_div`` apply a pending K-shift. There the K rows of the shifted cells are compared
separately (test_kv_shift.py checks the rotation numerically) and then synced from the
reference. The reference rotates ``seq_div`` cells the wrong way; pymem's cells record the
true displacement, so their pending shift differs from the reference's by its sign.

The failed restore (step 15, a truncated blob): pymem leaves the cache as it was, the
reference has removed seq 3 after placing the restored cells. The replay checks that
pymem changed nothing, then reproduces the reference's side effects with public calls.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from kv_helpers import (
    RecordedPositions,
    check_invariants,
    decode,
    fill_rows_from_part,
    parse_kv_part,
    strip_seq,
    strip_whole,
    tiny_llama_spec,
)

from pymem.errors import StateError
from pymem.kv import KVCache
from pymem.kv.state_io import _restore_ubatch
from pymem.spec import LayerSpec, ModelSpec, RopeSpec, RopeType

DATA = Path(__file__).parent / "data"
RUN = DATA / "runs" / "llama.main.fa0.u1.json"


def blob(blob_id: str) -> bytes:
    return (DATA / "blobs" / f"{blob_id}.bin").read_bytes()


def make_cache(run: dict, rope: bool) -> KVCache:
    mem = run["memory"]
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


def seq_positions(kv: KVCache) -> list[list[int]]:
    return [[kv.seq_pos_min(s), kv.seq_pos_max(s)] for s in range(4)]


def shifted_cells(kv: KVCache) -> list[np.ndarray]:
    return [np.flatnonzero((c.pos >= 0) & (c.shift != 0)) for c in kv.v_cells]


def k_rows_of(part, strm: int, layer: int, ranks: np.ndarray) -> np.ndarray:
    sp = part.streams[strm]
    _, row, kb = sp.k[layer]
    return np.frombuffer(kb, dtype=np.uint8).reshape(len(sp.cells), row)[ranks]


def replay(rope: bool, div_sign_as_reference: bool = False):
    run = json.loads(RUN.read_text())
    arch = run["memory"]["arch"].encode()
    kv = make_cache(run, rope)
    n_layer = len(kv.layers)
    log = []
    for step in run["steps"]:
        op = step["op"]
        ref_whole = strip_whole(blob(step["state"]))
        ref_part = parse_kv_part(ref_whole, n_layer)
        shifted = shifted_cells(kv) if op == "decode" else None
        result = None
        if op == "none":
            pass
        elif op == "decode":
            res = decode(kv, step["items"], n_ubatch=run["memory"]["n_ubatch"])
            result = res.code
            if res.code == 0:
                # fill the rows this decode wrote with the reference's bytes
                nonempty = np.flatnonzero(kv.v_cells[0].pos >= 0)
                assert len(ref_part.streams[0].cells) == nonempty.size
                for sinfo, _ub in res.placed:
                    idx = sinfo.idxs[0].astype(np.int64)
                    fill_rows_from_part(kv, ref_part, 0, idx, np.searchsorted(nonempty, idx))
        elif op == "seq_rm":
            result = kv.seq_rm(step["seq"], step["p0"], step["p1"])
        elif op == "seq_cp":
            kv.seq_cp(step["src"], step["dst"], step["p0"], step["p1"])
        elif op == "seq_keep":
            kv.seq_keep(step["seq"])
        elif op == "seq_add":
            kv.seq_add(step["seq"], step["p0"], step["p1"], step["delta"])
        elif op == "seq_div":
            assert not kv.get_has_shift()
            kv.seq_div(step["seq"], step["p0"], step["p1"], step["d"])
            if div_sign_as_reference:
                # the reference records old - new for seq_div (pymem: new - old)
                for cells in kv.v_cells:
                    cells.shift[:] = -cells.shift
        elif op == "clear":
            kv.clear(step["data"])
        elif op == "state_seq_set":
            data = strip_seq(blob(step["blob"]))
            before = kv.state_write()
            try:
                result = kv.state_read(data, step["seq"]) + 8
            except StateError:
                result = 0
                # pymem: nothing changed
                assert kv.state_write() == before
                emulate_failed_seq_restore(kv, data, step["seq"])
        elif op == "state_set":
            result = kv.state_read(strip_whole(blob(step["blob"])), -1) + 4 + len(arch)
        else:
            raise AssertionError(f"unknown op {op}")
        check_invariants(kv)
        assert result == step["result"], (step["i"], op)
        assert seq_positions(kv) == step["pos"], (step["i"], op)

        mine = kv.state_write()
        assert len(mine) + 4 + len(arch) == step["state_bytes"], step["i"]
        if shifted is not None and any(a.size for a in shifted):
            # K of cells the K-shift rotated: compare apart, then take the reference's
            mine_part = parse_kv_part(bytes(mine), n_layer)
            nonempty = np.flatnonzero(kv.v_cells[0].pos >= 0)
            cells = np.intersect1d(shifted[0], nonempty)
            ranks = np.searchsorted(nonempty, cells)
            for li in range(n_layer):
                log.append(
                    (
                        step["i"],
                        li,
                        cells,
                        k_rows_of(mine_part, 0, li, ranks),
                        k_rows_of(ref_part, 0, li, ranks),
                    )
                )
            fill_rows_from_part(kv, ref_part, 0, cells, ranks)
            mine = kv.state_write()
        assert bytes(mine) == ref_whole, f"step {step['i']} ({op}): whole-state blob differs"
        for s in range(4):
            ref_seq = strip_seq(blob(step["seq_state"][s]))
            got = kv.state_write(s)
            assert len(got) + 8 == step["seq_state_bytes"][s]
            assert bytes(got) == ref_seq, f"step {step['i']} ({op}): seq {s} blob differs"
    return kv, log


def emulate_failed_seq_restore(kv: KVCache, data: bytes, seq_id: int) -> None:
    """The reference's side effects of a per-sequence restore that fails in the data:
    remove the sequence, place the blob's cells, then remove them again."""
    part_cells = []
    n_stream, off = int.from_bytes(data[0:4], "little"), 4
    assert n_stream == 1
    n = int.from_bytes(data[off : off + 4], "little")
    off += 4
    for i in range(n):
        part_cells.append(
            int.from_bytes(data[off + 12 * i : off + 12 * i + 4], "little", signed=True)
        )
    kv.seq_rm(seq_id, -1, -1)
    ub = _restore_ubatch(kv, seq_id, np.array(part_cells, dtype=np.int32), None)
    sinfo = kv.find_slot(ub, False)
    assert sinfo is not None
    kv.apply_ubatch(sinfo, ub)
    kv.seq_rm(seq_id, -1, -1)
    kv.zero_cells(0, sinfo.idxs[0])


def test_replay_metadata_and_blobs():
    _kv, log = replay(rope=False)
    # the two K-shift decodes: steps 9 (seq_add +5 on seq 2) and 11 (seq_div /2 on seq 3)
    assert sorted({entry[0] for entry in log}) == [9, 11]
    for _i, _li, cells, mine, ref in log:
        # without RoPE the K-shift is metadata only: pymem's K rows are the unrotated ones
        assert cells.size > 0
        assert not np.array_equal(mine, ref)


def test_replay_k_shift_bytes():
    """pymem's K-shift graph reproduces llama.cpp's rotated K bytes exactly after seq_add;
    after seq_div it rotates the other way (the reference's sign is wrong), and matches
    byte for byte once the reference's sign is emulated."""
    _kv, log = replay(rope=True)
    same = {(i, li): np.array_equal(mine, ref) for i, li, _c, mine, ref in log}
    assert same == {(9, 0): True, (9, 1): True, (11, 0): False, (11, 1): False}
    _kv, log = replay(rope=True, div_sign_as_reference=True)
    assert all(np.array_equal(mine, ref) for _i, _li, _c, mine, ref in log) and len(log) == 4


@pytest.mark.parametrize("seq", [0, 1, 2, 3])
def test_restore_each_recorded_seq_blob_round_trips(seq):
    """Every recorded per-sequence blob restores into an empty cache and writes back equal."""
    run = json.loads(RUN.read_text())
    seen = set()
    for step in run["steps"]:
        b = step["seq_state"][seq]
        if b in seen:
            continue
        seen.add(b)
        data = strip_seq(blob(b))
        kv = make_cache(run, rope=False)
        assert kv.state_read(data, seq) == len(data)
        check_invariants(kv)
        assert bytes(kv.state_write(seq)) == data
        kv.close()


# ---------------------------------------------------------------------------------------
# jamba.main.fa1.u0: the attention part of a hybrid, one stream per sequence, V not
# transposed. Jamba has no RoPE, so the K-shift is metadata only and every byte of the
# KV part is reproducible. The hybrid wraps the cache: its seq_rm tries the recurrent
# part first (result False => the KV cache was not touched), and a restore that fails in
# the recurrent part undoes the KV part with state_clear.
# ---------------------------------------------------------------------------------------

JAMBA = DATA / "runs" / "jamba.main.fa1.u0.json"


def jamba_cache(run: dict) -> KVCache:
    mem = run["memory"]
    none = RopeSpec(n_rot=8, rope_type=RopeType.NONE)
    ssm = LayerSpec.ssm(96, 128)
    att = LayerSpec.attention(1, 8, rope=none)
    spec = ModelSpec(layers=(ssm, att, ssm, att), arch="jamba")
    part = mem["parts"][0]
    return KVCache(
        spec,
        type_k=part["k_type"],
        type_v=part["v_type"],
        v_trans=part["v_trans"],
        unified=mem["kv_unified"],
        kv_size=part["kv_size"],
        n_seq_max=part["n_seq_max"],
        filter=lambda il: not spec.layers[il].recurrent,
    )


def kv_part_of(data: bytes, n_layer: int):
    part = parse_kv_part(data, n_layer)
    return data[: part.end], part


def test_replay_jamba_attention_part():
    run = json.loads(JAMBA.read_text())
    kv = jamba_cache(run)
    assert kv.get_layer_ids() == [1, 3] and kv.n_stream == 4 and not kv.v_trans
    n_layer = 2
    zeros_seen = False
    prev_pos = None
    for step in run["steps"]:
        op = step["op"]
        recorded = "state" in step  # two seq_rm steps have sizes but no blobs
        ref_bytes, ref_part = (
            kv_part_of(strip_whole(blob(step["state"])), n_layer) if recorded else (None, None)
        )
        if op == "decode":
            res = decode(
                kv,
                step["items"],
                n_ubatch=run["memory"]["n_ubatch"],
                memory=RecordedPositions(prev_pos),
            )
            assert res.code == step["result"], step["i"]
            for sinfo, _ub in res.placed:
                for j, strm in enumerate(sinfo.strm.tolist()):
                    nonempty = np.flatnonzero(kv.v_cells[strm].pos >= 0)
                    idx = sinfo.idxs[j].astype(np.int64)
                    fill_rows_from_part(kv, ref_part, strm, idx, np.searchsorted(nonempty, idx))
        elif op == "seq_rm":
            if step["result"]:  # the recurrent part accepted it, so the hybrid went on
                assert kv.seq_rm(step["seq"], step["p0"], step["p1"]) is True
        elif op == "seq_cp":
            kv.seq_cp(step["src"], step["dst"], step["p0"], step["p1"])
        elif op == "seq_keep":
            kv.seq_keep(step["seq"])
        elif op == "seq_add":
            kv.seq_add(step["seq"], step["p0"], step["p1"], step["delta"])
        elif op == "seq_div":
            kv.seq_div(step["seq"], step["p0"], step["p1"], step["d"])
        elif op == "clear":
            kv.clear(step["data"])
        elif op == "state_seq_set":
            data, _ = kv_part_of(strip_seq(blob(step["blob"])), n_layer)
            assert kv.state_read(data, step["seq"]) == len(data)
            if step["result"] == 0:
                kv.state_clear(step["seq"])  # the recurrent part failed: the hybrid undoes
        elif op == "state_set":
            data, _ = kv_part_of(strip_whole(blob(step["blob"])), n_layer)
            assert kv.state_read(data, -1) == len(data)
        check_invariants(kv)
        prev_pos = step["pos"]
        if not recorded:
            continue
        mine = bytes(kv.state_write())
        assert mine == ref_bytes, f"step {step['i']} ({op}): KV part of the whole state differs"
        if op == "seq_cp":
            # the cross-stream copy is deferred: the destination's K rows are still zero
            sp = ref_part.streams[step["dst"]]
            zeros_seen |= not any(sp.k[0][2])
        for s in range(4):
            ref_seq, _ = kv_part_of(strip_seq(blob(step["seq_state"][s])), n_layer)
            assert bytes(kv.state_write(s)) == ref_seq, f"step {step['i']} ({op}): seq {s}"
    assert zeros_seen
