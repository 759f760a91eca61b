"""``llama_context::decode`` over a spec memory, with a synthetic "compute" step.

The compute step is what a model's graph does to memory tensors, reduced to a
deterministic byte function: attention layers write one K and one V row per token at the
planned cells (``set_rows`` through ``k_idxs``/``v_idxs``); recurrent layers zero the
``rs_z`` row, gather the states named by ``s_copy``, copy the extra states in place and
write each sequence's new state (and, with ``n_rs_seq``, its rollback snapshots). The
same functions drive pymem's tensors in the property tests, so state bytes can be
compared exactly.
"""

from __future__ import annotations

import hashlib
import struct

from .batch import Alloc, BatchIn, UBatch, alloc_init, compat
from .common import STATE_SEQ_MAGIC, SpecBatchError, SpecStateError
from .memory import Context, SpecMemory
from .state import Reader


def _fill(seed: bytes, n: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.blake2b(seed + counter.to_bytes(4, "little"), digest_size=64).digest()
        counter += 1
    return bytes(out[:n])


def kv_row(kind: str, il: int, pos: int, seq: int, tok: int, n: int) -> bytes:
    """Synthetic K or V row of one token in layer ``il``."""
    return _fill(f"{kind}:{il}:{pos}:{seq}:{tok}".encode(), n)


def rs_step(prev: bytes, kind: str, il: int, pos: int, tok: int) -> bytes:
    """Synthetic recurrent update: the next state depends on the previous one."""
    return _fill(prev[:64] + f"{kind}:{il}:{pos}:{tok}".encode(), len(prev))


def ubatch_token(ub: UBatch, i: int) -> int:
    return ub.token[i] if ub.token is not None else -1


def recurrent_compute(
    ub: UBatch,
    head: int,
    n_rs: int,
    rs_z: int,
    s_copy: list[int],
    size: int,
    n_rs_seq: int,
    layers: list[int],
    get_row,  # (kind "r"/"s", il, row) -> bytes
    set_row,  # (kind, il, row, bytes) -> None
) -> None:
    """The recurrent part of a ubatch's graph, on rows of R and S (``build_rs``)."""
    n_seqs = ub.n_seqs
    nst = ub.n_seq_tokens
    for kind in ("r", "s"):
        for il in layers:
            if rs_z >= 0:
                set_row(kind, il, rs_z, bytes(len(get_row(kind, il, rs_z))))
            main = [get_row(kind, il, s_copy[i]) for i in range(n_seqs)]
            extra = [get_row(kind, il, s_copy[i]) for i in range(n_seqs, n_rs)]
            for i in range(n_seqs, n_rs):
                set_row(kind, il, head + i, extra[i - n_seqs])
            for s in range(n_seqs):
                states = [main[s]]
                for t in range(nst):
                    i = s * nst + t
                    states.append(rs_step(states[-1], kind, il, ub.pos[i], ubatch_token(ub, i)))
                for k in range(min(nst, n_rs_seq + 1)):
                    set_row(kind, il, k * size + head + s, states[-1 - k])


def spec_compute(mem: SpecMemory, ctx: Context) -> dict:
    """Run the synthetic graph for the current ubatch; returns the graph inputs used."""
    ub = ctx.ubatch
    inputs: dict = {}
    for name, kc in ctx.kv.items():
        kv = kc.kv
        sinfo = kc.sinfo
        k_idxs = kv.k_idxs(sinfo)
        inputs[name] = {
            "idxs": [list(x) for x in sinfo.idxs],
            "strm": list(sinfo.strm),
            "k_idxs": k_idxs,
            "v_idxs": kv.v_idxs(sinfo),
            "n_kv": kc.n_kv,
        }
        for i in range(ub.n_tokens):
            for li, ly in enumerate(kv.cfg.layers):
                args = (ly.il, ub.pos[i], ub.seq_id[i][0], ubatch_token(ub, i))
                kv.write_token_rows(
                    li,
                    k_idxs[i],
                    kv_row("k", *args, kv.k_row[li]),
                    kv_row("v", *args, kv.v_row[li]),
                )
    if ctx.rs is not None:
        rs = ctx.rs
        s_copy = rs.s_copy_inputs()
        inputs["rs"] = {"head": rs.head, "n_rs": rs.n, "rs_z": rs.rs_z, "s_copy": s_copy}

        def get_row(kind: str, il: int, row: int) -> bytes:
            data, w = (rs.r_data, rs.r_row) if kind == "r" else (rs.s_data, rs.s_row)
            return bytes(data[il][row * w : (row + 1) * w])

        def set_row(kind: str, il: int, row: int, b: bytes) -> None:
            data, w = (rs.r_data, rs.r_row) if kind == "r" else (rs.s_data, rs.s_row)
            data[il][row * w : (row + 1) * w] = b

        recurrent_compute(
            ub,
            rs.head,
            rs.n,
            rs.rs_z,
            s_copy,
            rs.size,
            rs.n_rs_seq,
            rs.cfg.layers,
            get_row,
            set_row,
        )
    return inputs


def decode(
    mem: SpecMemory,
    batch: BatchIn,
    *,
    n_seq_max: int,
    n_vocab: int,
    n_ubatch: int,
    n_pos_per_embd: int = 1,
    output_all: bool = False,
    trace: list | None = None,
) -> int:
    """``llama_context::decode``: 0 ok, 1 no memory slot, -1 invalid batch."""
    if batch.n_tokens == 0:
        return -1
    try:
        toks = compat(batch, mem, n_seq_max, n_pos_per_embd)
        alloc: Alloc = alloc_init(
            toks,
            mem,
            n_seq_max=n_seq_max,
            n_vocab=n_vocab,
            n_pos_per_embd=n_pos_per_embd,
            output_all=output_all,
        )
    except SpecBatchError:
        return -1
    mem.update()
    ctx = mem.init_batch(alloc, n_ubatch, output_all)
    if ctx is None:
        if mem.update():
            ctx = mem.init_batch(alloc, n_ubatch, output_all)
        if ctx is None:
            return 1
    while True:
        ctx.apply()
        inputs = spec_compute(mem, ctx)
        if trace is not None:
            trace.append((ctx.ubatch, inputs))
        if not ctx.next():
            break
    return 0


# ------------------------------------------------------------------ envelopes ---


def seq_blob(seq_id: int, mem_bytes: bytes) -> bytes:
    """``llama_state_seq_get_data``: magic, source seq id, memory part."""
    return struct.pack("<Ii", STATE_SEQ_MAGIC, seq_id) + mem_bytes


def whole_blob(arch: str, mem_bytes: bytes) -> bytes:
    """``llama_state_get_data``: arch name (u32 length + bytes), memory part."""
    a = arch.encode()
    return struct.pack("<I", len(a)) + a + mem_bytes


def seq_blob_payload(blob: bytes) -> bytes:
    r = Reader(blob)
    if r.u32("magic") != STATE_SEQ_MAGIC:
        raise SpecStateError("wrong sequence state magic")
    r.i32("seq_id_src")
    return blob[r.off :]


def whole_blob_payload(blob: bytes, arch: str) -> bytes:
    r = Reader(blob)
    n = r.u32("arch length")
    name = r.raw(n, "arch").decode(errors="replace")
    if name != arch:
        raise SpecStateError(f"wrong model arch: '{name}' instead of '{arch}'")
    return blob[r.off :]
