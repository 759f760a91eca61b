"""KV cache state blobs: round trips for every option, the byte layout checked with an
independent parser, every validation error (and that a failed read changes nothing),
file streaming, and the two-phase parse/commit used by compositions."""

from __future__ import annotations

import io

import numpy as np
import pytest
from kv_helpers import check_invariants, decode, make_kv, make_spec, parse_kv_part

import pymem.kv.state_rows as sio
from pymem.errors import StateError
from pymem.kv import KVCache
from pymem.spec import RopeSpec, RopeType, SWAType
from pymem.state import StateReader


def randomize(kv: KVCache, seed: int = 0) -> None:
    """Random bytes in every K/V tensor (f16/f32 kept finite: bytes are just bytes here)."""
    rng = np.random.default_rng(seed)
    for layer in kv.layers:
        for t in (layer.k, layer.v):
            if t is not None:
                t.write_bytes(rng.integers(0, 256, t.nbytes, dtype=np.uint8).tobytes())


def populate(kv: KVCache) -> None:
    """Interleaved sequences, a shared prefix, holes from seq_rm: many runs of cells."""
    n = kv.n_seq_max
    if kv.n_stream == 1:
        decode(kv, [[1, p, list(range(min(n, 2))), False] for p in range(3)])
        items = []
        for k in range(4):
            for s in range(n):
                start = 3 if s < 2 else 0
                items.append([1, start + k, [s], True])
        decode(kv, items, n_ubatch=5)
    else:
        for s in range(n):
            decode(kv, [[1, p, [s], p == 5] for p in range(6)])
    kv.seq_rm(0, 4, 5)
    randomize(kv, 1)


def state_cfgs():
    yield "f16-trans", dict(type_k="f16", type_v="f16", v_trans=True)
    yield "f32-notrans", dict(type_k="f32", type_v="f32", v_trans=False)
    yield "q8_0-notrans", dict(type_k="q8_0", type_v="q8_0", v_trans=False)
    yield "f16-trans-streams", dict(type_k="f16", type_v="f16", v_trans=True, unified=False)
    yield "f32-notrans-streams", dict(type_k="f32", type_v="f32", v_trans=False, unified=False)
    yield "mrope-ext", dict(type_k="f16", type_v="f16", v_trans=True, mrope=True)
    yield "swa", dict(type_k="f16", type_v="f16", v_trans=True, n_swa=3, swa_type=SWAType.STANDARD)


CFGS = dict(state_cfgs())


def build(cfg: dict, n_cells: int = 32, n_seq: int = 3) -> KVCache:
    cfg = dict(cfg)
    mrope = cfg.pop("mrope", False)
    spec = make_spec(
        n_head_kv=1,
        head_dim=32,
        n_pos_per_embd=4 if mrope else 1,
        rope=RopeSpec(n_rot=32, rope_type=RopeType.MROPE if mrope else RopeType.NORM),
    )
    return KVCache(spec, kv_size=n_cells, n_seq_max=n_seq, **cfg)


@pytest.mark.parametrize("name", list(CFGS))
def test_round_trips(name):
    src = build(CFGS[name])
    populate(src)
    whole = bytes(src.state_write())
    assert src.state_size() == len(whole)
    dst = build(CFGS[name])
    assert dst.state_read(whole) == len(whole)
    check_invariants(dst)
    assert bytes(dst.state_write()) == whole
    assert [dst.seq_pos_max(s) for s in range(3)] == [src.seq_pos_max(s) for s in range(3)]
    for s in range(3):
        blob = bytes(src.state_write(s))
        other = build(CFGS[name])
        target = s  # blobs carry the seq id in every cell record
        assert other.state_read(blob, target) == len(blob)
        check_invariants(other)
        assert bytes(other.state_write(target)) == blob
        # and into a cache that already holds other data
        assert dst.state_read(blob, s) == len(blob)
        assert bytes(dst.state_write(s)) == blob
        check_invariants(dst)


@pytest.mark.parametrize("name", ["f16-trans", "f32-notrans", "mrope-ext", "f16-trans-streams"])
def test_blob_layout_matches_tensor_bytes(name):
    """Parse with an independent parser and compare every row/element with the tensors."""
    kv = build(CFGS[name])
    populate(kv)
    blob = bytes(kv.state_write())
    part = parse_kv_part(blob, len(kv.layers), has_ext=kv.with_ext)
    assert part.end == len(blob)
    for strm, sp in enumerate(part.streams):
        cells = kv.v_cells[strm]
        idx = np.flatnonzero(cells.pos >= 0)
        if sp is None:
            assert idx.size == 0
            continue
        assert [c[0] for c in sp.cells] == cells.pos[idx].tolist()
        assert [c[1] for c in sp.cells] == [cells.seq_ids_of(i) for i in idx]
        if kv.with_ext:
            assert [list(c[2]) for c in sp.cells] == cells.ext[idx].tolist()
        for li, layer in enumerate(kv.layers):
            k = layer.k.read_rows(strm * kv.kv_size + idx)
            assert sp.k[li][2] == k.tobytes() and sp.k[li][0] == kv.type_k.id
            vt = sp.v[li]
            if kv.v_trans:
                el = kv.type_v.type_size
                full = layer.v.numpy().view(np.uint8).reshape(kv.n_stream, -1, kv.kv_size, el)[strm]
                assert vt[3] == full[: vt[2], idx].tobytes() and vt[1] == el and vt[2] == 32
            else:
                assert vt[3] == layer.v.read_rows(strm * kv.kv_size + idx).tobytes()


def test_swa_sequence_blob_holds_only_the_window():
    kv = build(CFGS["swa"])
    decode(kv, [[1, p, [0], p == 9] for p in range(10)])
    blob = bytes(kv.state_write(0))
    part = parse_kv_part(blob, 2)
    # window 3 relative to pos_max 9: cells with 9 - p < 3
    assert [c[0] for c in part.streams[0].cells] == [7, 8, 9]
    assert len(parse_kv_part(bytes(kv.state_write()), 2).streams[0].cells) == 10


def test_many_runs_and_native_fallbacks_give_the_same_bytes(monkeypatch):
    """Gather (np.take), per-run slices, and the non-host code paths agree."""
    for name in ("f16-trans", "f32-notrans"):
        kv = build(CFGS[name], n_cells=256, n_seq=8)
        decode(kv, [[1, p, [s], False] for p in range(40) for s in range(6)], n_ubatch=64)
        kv.seq_rm(4, 30, -1)
        kv.seq_rm(5, 37, -1)
        decode(kv, [[1, p, [7], False] for p in range(10)], n_ubatch=64)  # fills the holes
        randomize(kv, 3)
        blobs = [bytes(kv.state_write(s)) for s in range(8)] + [bytes(kv.state_write())]
        # > _RUNS_LOOP runs: seq 3 every 6th cell (strided), seq 7 irregular
        assert len(sio.cell_runs(kv.v_cells[0].seq_cells(3))[0]) == 40
        assert len(sio.cell_runs(kv.v_cells[0].seq_cells(5))[0]) == 37
        with monkeypatch.context() as m:
            m.setattr(sio, "rows_view", lambda t: None)
            m.setattr(sio, "v_trans_view", lambda kv, layer, strm: None)
            assert [bytes(kv.state_write(s)) for s in range(8)] + [bytes(kv.state_write())] == blobs
            other = build(CFGS[name], n_cells=256, n_seq=8)
            for q in (3, 5):
                other.state_read(blobs[q], q)
                assert bytes(other.state_write(q)) == blobs[q]
            other.state_read(blobs[-1])
        assert bytes(other.state_write()) == blobs[-1]


def test_streaming_to_and_from_files():
    kv = build(CFGS["f16-trans"])
    populate(kv)
    f = io.BytesIO()
    f.write(b"HEAD")
    n = kv.state_write_to(f, 1)
    f.write(b"TAIL")
    assert f.getvalue()[4:-4] == bytes(kv.state_write(1)) and n == len(f.getvalue()) - 8
    other = build(CFGS["f16-trans"])
    f.seek(4)
    assert other.state_read_from(f, 1) == n
    assert f.read() == b"TAIL"  # the file is left right after the part
    assert bytes(other.state_write(1)) == bytes(kv.state_write(1))


def test_two_phase_parse_then_commit_and_stale_plans():
    kv = build(CFGS["f16-trans"])
    populate(kv)
    blob = bytes(kv.state_write(0))
    dst = build(CFGS["f16-trans"])
    decode(dst, [[1, p, [1], False] for p in range(4)])
    before = bytes(dst.state_write())
    plan = dst.state_read_parse(StateReader(blob), 0)
    assert bytes(dst.state_write()) == before  # parsing changes nothing
    plan.commit()
    assert bytes(dst.state_write(0)) == blob
    with pytest.raises(StateError):
        plan.commit()
    plan2 = dst.state_read_parse(StateReader(blob), 0)
    dst.seq_rm(1, -1, -1)
    with pytest.raises(StateError, match="changed"):
        plan2.commit()


def test_empty_sequence_blob_leaves_the_destination_as_it_was():
    # reference quirk kept: with cell_count 0 there is no seq_rm of the destination
    kv = build(CFGS["f16-trans"])
    populate(kv)
    empty = build(CFGS["f16-trans"])
    blob = bytes(empty.state_write(1))
    assert len(blob) == 8
    before = bytes(kv.state_write())
    assert kv.state_read(blob, 1) == 8
    assert bytes(kv.state_write()) == before


def mutate(blob: bytes, offset: int, value: bytes) -> bytes:
    return blob[:offset] + value + blob[offset + len(value) :]


def test_every_validation_error_changes_nothing():
    src = build(CFGS["f16-trans"])
    populate(src)
    seq_blob = bytes(src.state_write(1))
    whole = bytes(src.state_write())
    n_meta = 4 + 4 + 12 * int.from_bytes(seq_blob[4:8], "little")  # per-seq records: 3 words
    dst = build(CFGS["f16-trans"])
    populate(dst)
    dst.seq_rm(2, 1, -1)
    before = bytes(dst.state_write())
    snap = repr([c.snapshot() for c in dst.v_cells]), list(dst.v_heads)
    i32 = lambda v: int(v).to_bytes(4, "little", signed=True)  # noqa: E731
    cases = {
        "n_stream": mutate(seq_blob, 0, i32(2)),
        "n_seq_id": mutate(seq_blob, 12, i32(2)),
        "negative pos": mutate(seq_blob, 8, i32(-3)),
        "v_trans": mutate(seq_blob, n_meta, i32(0)),
        "n_layer": mutate(seq_blob, n_meta + 4, i32(3)),
        "k_type": mutate(seq_blob, n_meta + 8, i32(0)),
        "k_row": mutate(seq_blob, n_meta + 12, (65).to_bytes(8, "little")),
        "too many cells": mutate(seq_blob, 4, i32(33)),
        "whole: seq id out of range": mutate(whole, 8 + 8, i32(3)),
        "whole: duplicate id": None,
    }
    # a whole blob whose first cell lists seq 0 twice (first cell is shared by 0 and 1)
    assert whole[8:24] == i32(0) + i32(2) + i32(0) + i32(1)
    cases["whole: duplicate id"] = mutate(whole, 20, i32(0))
    for what, bad in cases.items():
        for seq in (-1,) if what.startswith("whole") else (1, 2):
            with pytest.raises(StateError):
                dst.state_read(bad, seq)
            assert bytes(dst.state_write()) == before, what
            assert snap == (repr([c.snapshot() for c in dst.v_cells]), list(dst.v_heads)), what
    # truncation anywhere
    for cut in range(len(seq_blob)):
        with pytest.raises(StateError):
            dst.state_read(seq_blob[:cut], 2)
    for cut in range(0, len(whole), 7):
        with pytest.raises(StateError):
            dst.state_read(whole[:cut], -1)
    assert bytes(dst.state_write()) == before
    check_invariants(dst)


def test_value_mismatches_name_the_field():
    src = build(CFGS["f32-notrans"])
    populate(src)
    blob = bytes(src.state_write(0))
    with pytest.raises(StateError, match="v_trans"):
        build(CFGS["f16-trans"]).state_read(blob, 0)
    with pytest.raises(StateError, match="k_type"):
        build(dict(type_k="f16", type_v="f32", v_trans=False)).state_read(blob, 0)
    with pytest.raises(StateError, match="v_type"):
        build(dict(type_k="f32", type_v="f16", v_trans=False)).state_read(blob, 0)
    wide = KVCache(
        make_spec(n_head_kv=2, head_dim=32),
        kv_size=32,
        n_seq_max=3,
        type_k="f32",
        type_v="f32",
        v_trans=False,
    )
    with pytest.raises(StateError, match="k_size_row"):
        wide.state_read(blob, 0)
    with pytest.raises(StateError, match="n_stream"):
        build(dict(CFGS["f32-notrans"], unified=False)).state_read(blob, 0)


def test_sequence_id_beyond_n_seq_max_writes_an_unreadable_blob():
    # reference quirk kept: a unified cache accepts ids < 256, but blobs only list ids
    # below n_seq_max, so the cells of seq 7 come out with n_seq_id 0
    kv = make_kv(16, 2)
    decode(kv, [[1, p, [0], False] for p in range(3)])
    kv.seq_cp(0, 7)
    blob = bytes(kv.state_write(7))
    part = parse_kv_part(blob, 2)
    assert [c[1] for c in part.streams[0].cells] == [[], [], []]
    with pytest.raises(StateError, match="n_seq_id"):
        make_kv(16, 2).state_read(blob, 1)


def test_failed_restore_zeroing_helper_and_state_clear():
    kv = build(CFGS["f16-trans"])
    populate(kv)
    only_1 = np.flatnonzero(kv.v_cells[0].owner == 1)
    shared = np.flatnonzero(kv.v_cells[0].owner == -2)
    kv.state_clear(1)
    assert kv.seq_pos_max(1) == -1
    k = kv.layers[0].k
    assert k.read_rows(only_1).max() == 0 and k.read_rows(shared).any()
    vt = sio.v_trans_view(kv.layout, kv.layers[0], 0)
    assert not vt[:, only_1].any()
    kv.state_clear(-1)
    assert kv.v_cells[0].used == 0 and not kv.layers[0].k.read_bytes().strip(b"\0")


def test_whole_restore_of_cells_without_sequences():
    # a whole-state blob may list a cell with n_seq_id 0: it is restored as a used cell
    # that no sequence sees (the reference's pos_set without seq_add)
    src = make_kv(8, 2)
    decode(src, [[1, 0, [0], False], [1, 1, [0], True]])
    blob = bytes(src.state_write())
    i32 = lambda v: int(v).to_bytes(4, "little", signed=True)  # noqa: E731
    assert blob[8:20] == i32(0) + i32(1) + i32(0)
    spliced = blob[:8] + i32(0) + i32(0) + blob[20:]  # cell 0: pos 0, no ids
    kv = make_kv(8, 2)
    assert kv.state_read(spliced) == len(spliced)
    check_invariants(kv)
    assert kv.v_cells[0].used == 2 and kv.v_cells[0].owner[:2].tolist() == [-1, 0]
    assert kv.seq_pos_min(0) == 1 and kv.seq_pos_min(1) == -1
    assert bytes(kv.state_write()) == spliced


@pytest.mark.parametrize("seed", range(5))
def test_gather_and_scatter_helpers_equal_fancy_indexing(seed):
    rng = np.random.default_rng(seed)
    k = 600
    patterns = [
        np.arange(3, 600, 7),  # strided single cells
        (np.arange(0, 560, 8)[:, None] + np.arange(3)).ravel(),  # strided runs of 3
        np.sort(rng.choice(k, 200, replace=False)),  # irregular
        np.arange(10, 30),  # one run
        np.sort(rng.choice(k, 20, replace=False)),  # few runs
    ]
    for idx in patterns:
        src = rng.integers(0, 60000, (5, k)).astype(np.uint16)
        out = np.empty((5, idx.size), np.uint16)
        sio.gather_cols(src, idx, out)
        assert np.array_equal(out, src[:, idx])
        dst = np.zeros_like(src)
        sio.scatter_cols(dst, idx, out)
        want = np.zeros_like(src)
        want[:, idx] = out
        assert np.array_equal(dst, want)
        runs = sio.cell_runs(idx)
        out2 = np.empty_like(out)
        sio.gather_cols(src, idx, out2, runs)
        assert np.array_equal(out2, out)
        # the same moves as native byte ranges (rows, and transposed elements)
        from pymem.backend import TensorSpec, TensorStore

        with TensorStore("CPU", [TensorSpec("t", "f16", (k, 5))]) as store:
            t = store["t"]
            t.numpy().view(np.uint16)[...] = src
            off, size = sio.col_ranges(0, 2 * k, 5, runs, 2)
            got = np.empty((5, idx.size), np.uint16)
            t.read_ranges_into(got, off, size)
            assert np.array_equal(got, src[:, idx])
            t.numpy()[...] = 0
            t.write_ranges(got, off, size)
            assert np.array_equal(t.numpy().view(np.uint16), want)
        with TensorStore("CPU", [TensorSpec("r", "i8", (24, k))]) as store:
            r = store["r"]
            rows = rng.integers(0, 255, (k, 24)).astype(np.uint8)
            r.numpy().view(np.uint8)[...] = rows
            for used in (24, 10):  # whole rows: a range per run; a row prefix: per cell
                off, size = sio.row_ranges(r, 0, idx, runs, used)
                assert off.size == (runs[0].size if used == 24 else idx.size)
                got = np.empty((idx.size, used), np.uint8)
                r.read_ranges_into(got, off, size)
                assert np.array_equal(got, rows[idx, :used])
            r.numpy()[...] = 0
            r.write_ranges(rows[idx], *sio.row_ranges(r, 0, idx, runs, 24))
            back = np.zeros_like(rows)
            back[idx] = rows[idx]
            assert np.array_equal(r.numpy().view(np.uint8), back)
            # the same through the runs kernel (one call per section, what state I/O uses)
            r.numpy().view(np.uint8)[...] = rows
            for used in (24, 10):
                offset, st, sz = sio.row_runs(r, 0, idx, runs, used)
                got = np.empty((idx.size, used), np.uint8)
                r.read_runs_into(got, offset, 1, 0, st, sz)
                assert np.array_equal(got, rows[idx, :used])
            r.numpy()[...] = 0
            offset, st, sz = sio.row_runs(r, 0, idx, runs, 24)
            r.write_runs(rows[idx], offset, 1, 0, st, sz)
            assert np.array_equal(r.numpy().view(np.uint8), back)
        with TensorStore("CPU", [TensorSpec("t", "f16", (k, 5))]) as store:
            t = store["t"]
            t.numpy().view(np.uint16)[...] = src
            st, sz = sio.col_runs(runs, 2)
            got = np.empty((5, idx.size), np.uint16)
            t.read_runs_into(got, 0, 5, 2 * k, st, sz)
            assert np.array_equal(got, src[:, idx])
            t.numpy()[...] = 0
            t.write_runs(got, 0, 5, 2 * k, st, sz)
            assert np.array_equal(t.numpy().view(np.uint16), want)


def test_range_builders_give_the_documented_ranges():
    class T:
        row_size = 8

    runs = (np.array([2, 9]), np.array([5, 10]))
    off, size = sio.row_ranges(T(), 0, np.array([2, 3, 4, 9]), runs, 8)  # type: ignore[arg-type]
    assert off.tolist() == [16, 72] and size.tolist() == [24, 8]
    off, size = sio.row_ranges(T(), 1, np.array([2, 3, 4, 9]), runs, 6)  # type: ignore[arg-type]
    assert off.tolist() == [24, 32, 40, 80] and size.tolist() == [6] * 4
    off, size = sio.col_ranges(0, 100, 2, runs, 2)
    assert off.tolist() == [4, 18, 104, 118] and size.tolist() == [6, 2, 6, 2]
    offset, st, sz = sio.row_runs(T(), 4, np.array([2, 3, 4, 9]), runs, 8)  # type: ignore[arg-type]
    assert offset == 32 and st.tolist() == [16, 72] and sz.tolist() == [24, 8]
    offset, st, sz = sio.row_runs(T(), 1, np.array([2, 3, 4, 9]), runs, 6)  # type: ignore[arg-type]
    assert offset == 8 and st.tolist() == [16, 24, 32, 72] and sz.tolist() == [6] * 4
    st, sz = sio.col_runs(runs, 2)
    assert st.tolist() == [4, 18] and sz.tolist() == [6, 2]


@pytest.mark.parametrize("name", ["f16-trans", "f32-notrans"])
def test_state_write_buffer_equals_state_write(name):
    # state_write_buffer (a reused caller buffer) gives state_write's bytes, per sequence
    # and whole, and restores from it give the same cache
    kv = build(CFGS[name])
    populate(kv)
    randomize(kv, 4)
    out = bytearray(kv.state_size() + 16)
    for seq in (-1, 0, 1):
        n = kv.state_write_buffer(out, seq)
        assert n == kv.state_size(seq) and bytes(out[:n]) == bytes(kv.state_write(seq))
    n = kv.state_write_buffer(out)
    other = build(CFGS[name])
    assert other.state_read(memoryview(out)[:n]) == n
    assert bytes(other.state_write()) == bytes(out[:n])
    check_invariants(other)


def test_whole_restore_zeroes_the_cells_it_does_not_fill():
    # as the reference's clear(true): free cells read as zeros after a whole restore
    kv = build(CFGS["f16-trans"])
    populate(kv)
    small = build(CFGS["f16-trans"])
    decode(small, [[1, p, [0], False] for p in range(3)])
    randomize(small, 9)
    blob = bytes(small.state_write())
    kv.state_read(blob)
    for layer in kv.layers:
        assert not layer.k.read_rows(np.arange(3, 32)).any()
        assert not sio.v_trans_view(kv.layout, layer, 0)[:, 3:].any()
        assert np.array_equal(
            layer.k.read_rows([0, 1, 2]),
            small.layers[0 if layer.il == 0 else 1].k.read_rows([0, 1, 2]),
        )


@pytest.mark.parametrize("name", ["f16-trans", "f32-notrans"])
def test_zeroing_paths_for_non_host_tensors(monkeypatch, name):
    """The native (non-host) branches of the zeroing helpers give the host branches' bytes."""

    def run(patch: bool) -> list[bytes]:
        kv = build(CFGS[name])
        populate(kv)
        small = build(CFGS[name])
        decode(small, [[1, p, [0], False] for p in range(3)])
        randomize(small, 4)
        with monkeypatch.context() as m:
            if patch:
                m.setattr(sio, "rows_view", lambda t: None)
                m.setattr(sio, "v_trans_view", lambda kv, layer, strm: None)
            kv2 = build(CFGS[name])
            populate(kv2)
            kv2.state_clear(1)  # zero_cells
            kv.state_read(bytes(small.state_write()))  # zero_range
        out = []
        for c in (kv, kv2):
            for layer in c.layers:
                out += [layer.k.read_bytes(), layer.v.read_bytes()]
        return out

    assert run(True) == run(False)


def test_state_flags_are_one_behaviour_for_every_memory() -> None:
    """ON_DEVICE leaves pymem's bytes unchanged for every memory type (recurrent memory
    used to refuse it while KV caches ignored it); unknown flag bits are a RangeError."""
    from pymem import ContextParams, LayerSpec, ModelSpec, create_memory
    from pymem.errors import RangeError as _RangeError
    from pymem.memory import StateFlags

    specs = {
        "kv": ModelSpec(layers=(LayerSpec.attention(n_head_kv=2, head_dim=8),) * 2),
        "recurrent": ModelSpec(layers=(LayerSpec.ssm(n_embd_r=8, n_embd_s=16),) * 2),
        "hybrid": ModelSpec(
            layers=(LayerSpec.ssm(n_embd_r=8, n_embd_s=16), LayerSpec.attention(2, 8))
        ),
    }
    for name, spec in specs.items():
        with create_memory(spec, ContextParams(n_ctx=256, n_seq_max=2, n_ubatch=64)) as mem:
            for seq in (-1, 0):
                plain = mem.state_write(seq)
                assert mem.state_write(seq, StateFlags.ON_DEVICE) == plain, name
                assert mem.state_read(plain, seq, StateFlags.ON_DEVICE) == len(plain), name
            with pytest.raises(_RangeError, match="unknown bits"):
                mem.state_write(-1, 8)
