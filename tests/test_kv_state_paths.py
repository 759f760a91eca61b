"""Every data path of KV state I/O gives the same bytes: per-run slices, lockstep strided
views, numpy element gathers, native byte ranges (``read_ranges_into`` / ``write_ranges``)
on host tensors, the one-call native store of a restore (``state_io.put_payloads``), and
the non-host code (forced by hiding the numpy views). Pins the blob bytes against an
independent fancy-indexing reading of the tensors, for sequences spread over many
irregular runs of cells (the case the range copies were added for)."""

from __future__ import annotations

import numpy as np
import pytest
from kv_helpers import check_invariants, decode, parse_kv_part
from test_kv_state import CFGS, build, randomize

import pymem.kv.state_io as state_io
import pymem.kv.state_rows as sio

N_TOK = {2: 200, 24: 500}  # enough decode steps for > 32 runs per sequence


def _interleaved(kv, rng: np.random.Generator, n_seq: int, n_tok: int, max_run: int) -> None:
    """Decode steps that give each sequence 0 to ``max_run`` tokens: every sequence ends
    up spread over many runs of cells of irregular lengths and gaps."""
    pos = [0] * n_seq
    while min(pos) < n_tok:
        items = []
        for s in range(n_seq):
            for _ in range(min(int(rng.integers(0, max_run + 1)), n_tok - pos[s])):
                items.append([1, pos[s], [s], False])
                pos[s] += 1
        if items:
            decode(kv, items, n_ubatch=len(items))


def _expected_part(kv, seq: int) -> tuple[np.ndarray, list[bytes], list[bytes]]:
    cells = np.flatnonzero(kv.v_cells[0].seq_mask(seq))
    ks = [layer.k.read_rows(cells).tobytes() for layer in kv.layers]
    if kv.v_trans:
        vs = [sio.v_trans_view(kv.layout, layer, 0)[:, cells].tobytes() for layer in kv.layers]
    else:
        vs = [layer.v.read_rows(cells).tobytes() for layer in kv.layers]
    return cells, ks, vs


@pytest.mark.parametrize("name", ["f16-trans", "f32-notrans", "q8_0-notrans"])
@pytest.mark.parametrize("max_run", [2, 24])
def test_fragmented_sequences_every_path_same_bytes(monkeypatch, name: str, max_run: int) -> None:
    rng = np.random.default_rng(max_run)
    kv = build(CFGS[name], n_cells=2048, n_seq=3)
    _interleaved(kv, rng, 3, N_TOK[max_run], max_run)
    randomize(kv, 5)
    check_invariants(kv)
    runs = sio.cell_runs(np.flatnonzero(kv.v_cells[0].seq_mask(1)))
    assert runs[0].size > sio._RUNS_LOOP and not sio._lockstep(*runs)
    if kv.v_trans:
        # a host always takes the one native runs call (it beats numpy's gathers at every
        # run length); a device stages many short runs through the host
        el = kv.type_v.type_size
        method = sio.cols_method(True, runs, el, sio._RANGES_MIN_GATHER)
        assert method == "ranges"
        method = sio.cols_method(False, runs, el, sio._RANGES_MIN_GATHER)
        assert method == ("ranges" if max_run > 2 else "staged")
    blobs = [bytes(kv.state_write(s)) for s in range(3)] + [bytes(kv.state_write())]
    for s in range(3):
        cells, ks, vs = _expected_part(kv, s)
        part = parse_kv_part(blobs[s], 2).streams[0]
        assert [c[0] for c in part.cells] == kv.v_cells[0].pos[cells].tolist()
        assert [k[2] for k in part.k] == ks and [v[3] for v in part.v] == vs

    def paths():
        yield "host"  # restores store the bytes with state_io.put_payloads (one call)
        for forced in ("numpy", "ranges"):
            with monkeypatch.context() as m:
                m.setattr(state_io, "NATIVE_RUNS", False)  # through state_rows
                m.setattr(sio, "cols_method", lambda host, runs, el, n, forced=forced: forced)
                yield f"host {forced}"
        for forced in (None, "ranges", "staged"):
            with monkeypatch.context() as m:
                m.setattr(state_io, "NATIVE_RUNS", False)
                m.setattr(sio, "rows_view", lambda t: None)
                m.setattr(sio, "v_trans_view", lambda kv, layer, strm: None)
                if forced:
                    m.setattr(sio, "cols_method", lambda host, runs, el, n, forced=forced: forced)
                yield f"device {forced}"

    for _path in paths():
        assert [bytes(kv.state_write(s)) for s in range(3)] + [bytes(kv.state_write())] == blobs
        # restore each sequence into a cache fragmented the same way (other K/V bytes)
        dst = build(CFGS[name], n_cells=2048, n_seq=3)
        _interleaved(dst, np.random.default_rng(max_run), 3, N_TOK[max_run], max_run)
        randomize(dst, 6)
        for s in (2, 0, 1):
            dst.state_read(blobs[s], s)
            assert bytes(dst.state_write(s)) == blobs[s]
        check_invariants(dst)
        whole = build(CFGS[name], n_cells=2048, n_seq=3)
        whole.state_read(blobs[-1])
        assert bytes(whole.state_write()) == blobs[-1]


@pytest.mark.parametrize("name", ["f16-trans", "f32-notrans"])
def test_zero_cells_every_path_same_bytes(monkeypatch, name: str) -> None:
    """zero_cells of scattered single cells (staged span on a device), of long runs (native
    ranges) and on a host view leave the same bytes: zeros exactly at those cells."""
    cases = [np.arange(3, 900, 7), np.concatenate((np.arange(10, 200), np.arange(300, 700)))]
    for idx in cases:
        out = []
        for device in (False, True):
            kv = build(CFGS[name], n_cells=1024, n_seq=3)
            randomize(kv, 7)
            with monkeypatch.context() as m:
                if device:
                    m.setattr(sio, "rows_view", lambda t: None)
                    m.setattr(sio, "v_trans_view", lambda kv, layer, strm: None)
                sio.zero_cells(kv.layout, kv.layers, 0, idx)
            out.append([t.read_bytes() for layer in kv.layers for t in (layer.k, layer.v)])
            if kv.v_trans:
                vt = sio.v_trans_view(kv.layout, kv.layers[0], 0)
                assert not vt[:, idx].any()
                rest = np.setdiff1d(np.arange(1024), idx)
                assert np.count_nonzero(vt[:, rest]) > 0.99 * vt[:, rest].size
        assert out[0] == out[1]
