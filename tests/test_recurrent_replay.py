"""Parity replay of a recorded llama.cpp run on recurrent memory (tests/data/runs/mamba.main.u1.json).

Every step is replayed through pymem: decodes go through BatchAllocator + init_batch +
apply, sequence ops and restores are called as recorded. After each step the result and
the positions of sequences 0..3 must equal the reference's, and pymem's per-sequence and
whole-state blobs must equal the recorded ones byte for byte.

R/S bytes come from llama.cpp's kernels, which pymem does not run. So after each decode
the test plays the graph's part: the rows of the cells the ubatches wrote (``[head, head
+ n)`` of each ubatch) are taken from the reference's whole-state blob of that step (its
cells come in ascending cell order, so the k-th cell there is pymem's k-th non-empty
cell). Everything else in the blobs (cell selection, order, positions, sequence sets,
headers, which rows are read for each cell, rows restored from blobs) is pymem's own.

One deliberate difference: a failed restore leaves pymem unchanged, while the reference
empties the destination sequence (it had already removed it and placed the new cell
before the data turned out truncated). The replay reproduces the reference's sequence of
operations after pymem's refusal (``seq_rm``, ``find_slot`` of the blob's cell,
``seq_rm``) so the later steps start from the same cells, and checks that pymem itself
changed nothing.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from pymem.batch import Batch, BatchAllocator
from pymem.errors import BatchError, StateError
from pymem.memory import MemoryStatus
from pymem.recurrent import RecurrentMemory
from pymem.spec import LayerSpec, ModelSpec
from pymem.ubatch import UBatch

DATA = Path(__file__).parent / "data"
RUN = DATA / "runs" / "mamba.main.u1.json"
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


def parse_whole(mem_bytes: bytes, n_layer: int, row_r: int, row_s: int):
    """Reference whole-state memory part -> (cells [(pos, seq ids)], R rows, S rows) per layer."""
    off = 0

    def u32() -> int:
        nonlocal off
        (v,) = struct.unpack_from("<I", mem_bytes, off)
        off += 4
        return v

    def i32() -> int:
        nonlocal off
        (v,) = struct.unpack_from("<i", mem_bytes, off)
        off += 4
        return v

    count = u32()
    cells = []
    for _ in range(count):
        pos = i32()
        ids = [i32() for _ in range(u32())]
        cells.append((pos, ids))
    assert u32() == 0
    assert u32() == n_layer
    planes = []
    for row in (row_r, row_s):
        layers = []
        for _ in range(n_layer):
            off += 4 + 8
            layers.append(np.frombuffer(mem_bytes, np.uint8, count * row, off).reshape(count, row))
            off += count * row
        planes.append(layers)
    assert off == len(mem_bytes)
    return cells, planes[0], planes[1]


def make_memory(run: dict) -> RecurrentMemory:
    m = run["memory"]
    part = m["parts"][0]
    layers = tuple(LayerSpec.ssm(lay["n_embd_r"], lay["n_embd_s"]) for lay in m["layers"])
    spec = ModelSpec(layers=layers, arch=m["arch"])
    return RecurrentMemory(
        spec,
        type_r=part["r_type"],
        type_s=part["s_type"],
        mem_size=part["mem_size"],
        n_seq_max=m["n_seq_max"],
        n_rs_seq=part["n_rs_seq"],
    )


def play_graph(mem: RecurrentMemory, written: set[int], ref_whole: bytes) -> None:
    """Write the reference's post-decode R/S rows into the cells the ubatches wrote."""
    n_layer = mem.spec.n_layer
    r0, s0 = mem.get_r_l(0), mem.get_s_l(0)
    cells, r_rows, s_rows = parse_whole(ref_whole, n_layer, r0.row_size, s0.row_size)
    filled = np.flatnonzero(mem.cells.seq_counts())
    assert len(filled) == len(cells)
    rank = {int(c): k for k, c in enumerate(filled)}
    for cell in sorted(written):
        for il in mem.layers:
            for t, rows in ((mem.get_r_l(il), r_rows), (mem.get_s_l(il), s_rows)):
                if cell in rank:
                    t.write_rows([cell], rows[il][rank[cell]])
                else:
                    t.fill_rows([cell], 0)  # an empty cell in range receives the zero state


def check_invariants(mem: RecurrentMemory) -> None:
    """Tail/cell consistency as the reference's debug check, plus pymem's own promises."""
    c = mem.cells
    size = c.size
    assert ((c.tail >= -1) & (c.tail < size)).all()
    counts = c.seq_counts()
    assert c.used == int(np.count_nonzero(counts))
    assert (c.pos[counts == 0] == -1).all()
    src_empty = c.src[counts == 0]
    assert ((src_empty == -1) | (src_empty == np.flatnonzero(counts == 0))).all()
    assert (c.src[counts > 0] == np.flatnonzero(counts > 0)).all()
    assert 0 <= c.head < size
    assert (c.rs_idx <= mem.n_rs_seq).all()


@pytest.fixture(scope="module")
def run() -> dict:
    return json.loads(RUN.read_text())


def test_replay_mamba(run: dict) -> None:
    mem = make_memory(run)
    arch = run["memory"]["arch"]
    n_seq_max = run["memory"]["n_seq_max"]
    n_ubatch = run["context_params"]["n_ubatch"]
    balloc = BatchAllocator()
    assert mem.memory_breakdown() == {"CPU": 4 * (2 * 384 + 2 * 512)}
    n_checked = 0

    for step in run["steps"]:
        op = step["op"]
        result = None
        if op == "decode":
            batch = Batch.from_items(step["items"])
            try:
                balloc.init(batch, memory=mem, n_seq_max=n_seq_max)
            except BatchError:
                result = -1
            else:
                ctx = mem.init_batch(balloc, n_ubatch, embd_all=False)
                if ctx.get_status() != MemoryStatus.SUCCESS:
                    result = 1
                else:
                    written: set[int] = set()
                    while True:
                        ctx.apply()
                        written.update(range(ctx.get_head(), ctx.get_head() + ctx.get_n_rs()))
                        if not ctx.next():
                            break
                    play_graph(mem, written, strip_whole(blob(step["state"]), arch))
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
            before = mem.state_write()
            cells_before = mem.cells.copy()
            try:
                result = 8 + mem.state_read(data, step["seq"])
            except StateError:
                result = 0
                # pymem changed nothing ...
                assert mem.state_write() == before
                assert np.array_equal(mem.cells.tail, cells_before.tail)
                assert mem.head == cells_before.head
                # ... then the test replays what the reference did before it failed
                seq = step["seq"]
                mem.seq_rm(seq, -1, -1)
                (pos,) = struct.unpack_from("<i", data, 4)
                ub = UBatch.reserve(1, 1)
                ub.seq_id[0, 0] = seq
                ub.pos[0] = pos
                assert mem.find_slot(ub)
                mem.seq_rm(seq, -1, -1)
        elif op == "state_set":
            data = strip_whole(blob(step["blob"]), arch)
            result = 4 + len(arch) + mem.state_read(data)
        else:
            assert op == "none"
        check_invariants(mem)

        where = f"step {step['i']} ({op}: {step.get('note', '')})"
        assert result == step["result"], where
        pos = [[mem.seq_pos_min(s), mem.seq_pos_max(s)] for s in range(4)]
        assert pos == step["pos"], where
        seq_blobs = [mem.state_write(s) for s in range(4)]
        whole = mem.state_write()
        # sizes are recorded for every step, blobs for most (prefixes: 8 bytes / len + arch)
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
