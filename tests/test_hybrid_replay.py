"""Parity replay of a recorded llama.cpp run on hybrid memory (tests/data/runs/jamba.main.fa1.u0.json).

tiny-jamba (recurrent, attention, recurrent, attention), flash attention on (V not
transposed), one attention stream per sequence, 4 sequences. The memory is built by
``pymem.factory.create_memory`` from the GGUF file and the run's context parameters, and
every step is replayed through it: decodes go through BatchAllocator + init_update +
init_batch + apply (the reference's ``llama_context::decode`` memory flow), sequence ops
and restores are called as recorded. After each step: the result, the positions of all 4
sequences, and pymem's per-sequence and whole-state blobs byte for byte.

K/V and R/S bytes come from llama.cpp's kernels, which pymem does not run. So after each
decode the test plays the graph's part: for the cells the ubatches wrote (attention: the
slot cells of each stream; recurrent: ``[head, head + n_rs)``), the rows are copied from
the reference's whole-state blob of that step (cells are listed in ascending order, so
the k-th cell there is pymem's k-th non-empty cell of the same stream). Everything else
(cell placement, selection, order, positions, sequence sets, headers, pending stream
copies, rows restored from blobs) is pymem's own.

One deliberate difference: the truncated restore (step 15) leaves pymem unchanged (checked
on the whole-state bytes), while the reference restores the attention part, fails in the
recurrent part, then undoes the attention part, leaving the destination empty. The replay
then reproduces the reference's operations so later steps start from the same cells.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from kv_helpers import check_invariants as check_kv
from kv_helpers import fill_rows_from_part, parse_kv_part
from test_recurrent_replay import check_invariants as check_recr

from pymem.batch import Batch, BatchAllocator
from pymem.errors import BatchError, StateError
from pymem.factory import ContextParams, create_memory
from pymem.gguf_spec import spec_from_gguf
from pymem.hybrid import HybridMemory
from pymem.memory import MemoryStatus
from pymem.ubatch import UBatch

DATA = Path(__file__).parent / "data"
RUN = DATA / "runs" / "jamba.main.fa1.u0.json"
MODEL = DATA / "models" / "tiny-jamba.gguf"
SEQ_MAGIC = 0xAF143CD8


def blob(blob_id: str) -> bytes:
    return (DATA / "blobs" / f"{blob_id}.bin").read_bytes()


def strip_seq(data: bytes) -> tuple[int, bytes]:
    magic, seq = struct.unpack_from("<Ii", data, 0)
    assert magic == SEQ_MAGIC
    return seq, data[8:]


def strip_whole(data: bytes, arch: str) -> bytes:
    (n,) = struct.unpack_from("<I", data, 0)
    assert data[4 : 4 + n].decode() == arch
    return data[4 + n :]


def check_hybrid(mem: HybridMemory, n_seq: int) -> None:
    """Each part's invariants, and the composition rules over them."""
    check_kv(mem.mem_attn)  # type: ignore[arg-type]
    check_recr(mem.mem_recr)
    for s in range(n_seq):
        r = mem.seq_pos_ranges(s)
        assert mem.seq_pos_min(s) == max(r["attention"][0], r["recurrent"][0])
        assert mem.seq_pos_max(s) == min(r["attention"][1], r["recurrent"][1])
        assert r["recurrent"][0] == r["recurrent"][1]


def play_graph(
    mem: HybridMemory, attn_written: dict[int, set[int]], recr_written: set[int], ref: bytes
) -> None:
    """Write the reference's post-decode K/V and R/S rows into the cells the ubatches wrote."""
    kv = mem.mem_attn
    rec = mem.mem_recr
    part = parse_kv_part(ref, len(kv.layers))  # type: ignore[union-attr]
    for strm, written in attn_written.items():
        cells = kv.v_cells[strm]  # type: ignore[union-attr]
        filled = np.flatnonzero(cells.pos >= 0)
        sp = part.streams[strm]
        assert sp is not None and len(sp.cells) == len(filled)
        assert [c[0] for c in sp.cells] == cells.pos[filled].tolist()
        rank_of = {int(c): k for k, c in enumerate(filled)}
        idx = np.array(sorted(c for c in written if c in rank_of), dtype=np.int64)
        rank = np.array([rank_of[int(c)] for c in idx], dtype=np.int64)
        fill_rows_from_part(kv, part, strm, idx, rank)  # type: ignore[arg-type]

    r0, s0 = rec.get_r_l(rec.layers[0]), rec.get_s_l(rec.layers[0])
    cells_r, r_rows, s_rows = parse_rs_part(
        ref[part.end :], rec.spec.n_layer, len(rec.layers), r0.row_size, s0.row_size
    )
    filled = np.flatnonzero(rec.cells.seq_counts())
    assert [c[0] for c in cells_r] == rec.cells.pos[filled].tolist()
    rank_r = {int(c): k for k, c in enumerate(filled)}
    for cell in sorted(recr_written):
        for k, il in enumerate(rec.layers):
            for t, rows in ((rec.get_r_l(il), r_rows), (rec.get_s_l(il), s_rows)):
                if cell in rank_r:
                    t.write_rows([cell], rows[k][rank_r[cell]])
                else:
                    t.fill_rows([cell], 0)  # an empty cell in range receives the zero state


def parse_rs_part(data: bytes, n_layer: int, n_sections: int, row_r: int, row_s: int):
    """A whole-state recurrent part (format b.3) -> (cells [(pos, ids)], R rows, S rows).

    ``n_layer`` is the header's model layer count; only ``n_sections`` layers (those with
    R/S) have data sections.
    """
    off = 0

    def take(fmt: str) -> tuple:
        nonlocal off
        v = struct.unpack_from(fmt, data, off)
        off += struct.calcsize(fmt)
        return v

    (count,) = take("<I")
    cells = []
    for _ in range(count):
        pos, n = take("<iI")
        cells.append((pos, list(take(f"<{n}i"))))
    assert take("<II") == (0, n_layer)
    planes = []
    for row in (row_r, row_s):
        layers = []
        for _ in range(n_sections):
            _, size_row = take("<iQ")
            assert size_row == row
            layers.append(np.frombuffer(data, np.uint8, count * row, off).reshape(count, row))
            off += count * row
        planes.append(layers)
    assert off == len(data)
    return cells, planes[0], planes[1]


@pytest.fixture(scope="module")
def run() -> dict:
    return json.loads(RUN.read_text())


def test_replay_jamba(run: dict) -> None:
    mem = create_memory(spec_from_gguf(MODEL), ContextParams.from_dict(run["context_params"]))
    assert isinstance(mem, HybridMemory) and not mem.is_iswa
    arch = run["memory"]["arch"]
    n_seq_max = run["memory"]["n_seq_max"]
    n_ubatch = run["memory"]["n_ubatch"]
    # attention: 2 layers x K/V [8, 256 cells, 4 streams] f16; recurrent: 2 layers x 4 cells x (96 + 128) f32
    assert mem.memory_breakdown_by_part() == {
        "attention": {"CPU": 2 * 2 * 8 * 256 * 4 * 2},
        "recurrent": {"CPU": 2 * 4 * (96 + 128) * 4},
    }
    balloc = BatchAllocator(mem.n_pos_per_embd)
    n_checked = 0

    for step in run["steps"]:
        op = step["op"]
        result = None
        if op == "decode":
            try:
                balloc.init(Batch.from_items(step["items"]), memory=mem, n_seq_max=n_seq_max)
            except BatchError:
                result = -1
            else:
                upd = mem.init_update(False)
                if upd.get_status() == MemoryStatus.SUCCESS:
                    upd.apply()
                ctx = mem.init_batch(balloc, n_ubatch, embd_all=False)
                if ctx.get_status() != MemoryStatus.SUCCESS:
                    assert ctx.get_status() == MemoryStatus.FAILED_PREPARE
                    upd = mem.init_update(True)
                    if upd.get_status() == MemoryStatus.SUCCESS:
                        upd.apply()
                    result = 1
                else:
                    attn_written: dict[int, set[int]] = {}
                    recr_written: set[int] = set()
                    while True:
                        ctx.apply()
                        sinfo = ctx.get_attn().get_sinfo()  # type: ignore[union-attr]
                        for s in range(sinfo.n_stream):
                            attn_written.setdefault(int(sinfo.strm[s]), set()).update(
                                sinfo.idxs[s].tolist()
                            )
                        rc = ctx.get_recr()
                        recr_written.update(range(rc.get_head(), rc.get_head() + rc.get_n_rs()))
                        if not ctx.next():
                            break
                    play_graph(
                        mem, attn_written, recr_written, strip_whole(blob(step["state"]), arch)
                    )
                    result = 0
        elif op == "seq_rm":
            result = mem.seq_rm(step["seq"], step["p0"], step["p1"])
        elif op == "seq_cp":
            mem.seq_cp(step["src"], step["dst"], step["p0"], step["p1"])
        elif op == "seq_keep":
            mem.seq_keep(step["seq"])
        elif op == "seq_add":
            mem.seq_add(step["seq"], step["p0"], step["p1"], step["delta"])
        elif op == "seq_div":
            mem.seq_div(step["seq"], step["p0"], step["p1"], step["d"])
        elif op == "clear":
            mem.clear(step["data"])
        elif op == "state_seq_set":
            _, data = strip_seq(blob(step["blob"]))
            seq = step["seq"]
            before = mem.state_write()
            try:
                result = 8 + mem.state_read(data, seq)
            except StateError:
                result = 0
                assert mem.state_write() == before  # pymem changed nothing ...
                # ... then the test replays what the reference did before it failed:
                # the attention part restored, the recurrent part placed its cell and
                # failed (removing the sequence), then the attention part was undone.
                end = parse_kv_part(data, len(mem.mem_attn.layers)).end  # type: ignore[union-attr]
                mem.mem_attn.state_read(data[:end], seq)
                rec = mem.mem_recr
                rec.seq_rm(seq, -1, -1)
                (n_cells, pos) = struct.unpack_from("<Ii", data, end)
                assert n_cells == 1
                ub = UBatch.reserve(1, 1)
                ub.seq_id[0, 0] = seq
                ub.pos[0] = pos
                assert rec.find_slot(ub)
                rec.seq_rm(seq, -1, -1)
                mem.mem_attn.state_clear(seq)  # type: ignore[union-attr]
        elif op == "state_set":
            data = strip_whole(blob(step["blob"]), arch)
            result = 4 + len(arch) + mem.state_read(data)
        else:
            assert op == "none"
        check_hybrid(mem, 4)

        where = f"step {step['i']} ({op}: {step.get('note', '')})"
        assert result == step["result"], where
        pos = [[mem.seq_pos_min(s), mem.seq_pos_max(s)] for s in range(4)]
        assert pos == step["pos"], where
        seq_blobs = [mem.state_write(s) for s in range(4)]
        whole = mem.state_write()
        assert [8 + len(b) for b in seq_blobs] == step["seq_state_bytes"], where
        assert 4 + len(arch) + len(whole) == step["state_bytes"], where
        for s, blob_id in enumerate(step.get("seq_state", [])):
            seq, ref = strip_seq(blob(blob_id))
            assert seq == s
            assert seq_blobs[s] == ref, f"{where}: seq {s} blob"
        if "state" in step:
            assert whole == strip_whole(blob(step["state"]), arch), f"{where}: whole blob"
            n_checked += 1
    assert n_checked == 31
    mem.close()
