"""Hostile inputs for pymem: damaged and mismatched state blobs, invalid batches.

Test harness (imports pymem); used by tests/test_hostile.py and by the report. Every
case must end in a typed :class:`pymem.errors.PymemError` with the memory exactly as it
was (metadata, heads, pending work and every tensor byte), or, for a damaged blob that
still parses, in the same state the spec reaches from the same blob.
"""

from __future__ import annotations

import json
import random
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pymem.errors import PymemError
from pymem.factory import ContextParams, create_memory
from pymem.gguf_spec import spec_from_gguf

from .harness import Config, Pair, pm_kv_parts, pm_rs
from .runs import DATA, load_blob

RUNS = {
    "kv": ("llama.main.fa0.u1", "tiny-llama"),
    "recurrent": ("mamba.main.u1", "tiny-mamba"),
    "hybrid": ("jamba.main.fa1.u0", "tiny-jamba"),
}


def snapshot(mem: Any, full: bool = True) -> tuple:
    """Everything a failed operation must leave as it was: cell metadata, heads, pending
    copies, every tensor byte, the positions of every sequence and (``full``) the
    whole-state blob, which is derived from the rest but costs most to produce."""
    parts: list = [mem.state_write(-1)] if full else []
    n_seq = getattr(mem, "n_seq_max", 0)
    parts.append(tuple((mem.seq_pos_min(s), mem.seq_pos_max(s)) for s in range(n_seq)))
    for name, kv in sorted(pm_kv_parts(mem).items()):
        parts.append(name)
        for c in kv.v_cells:
            parts += [c.pos.tobytes(), c.seq.tobytes(), c.shift.tobytes(), bool(c.has_shift)]
        parts.append(tuple(kv.v_heads))
        parts.append(tuple(kv._pending_copies))
        for layer in kv.layers:
            parts.append(layer.k.read_bytes())
            if layer.v is not None:
                parts.append(layer.v.read_bytes())
    rs = pm_rs(mem)
    if rs is not None:
        c = rs.cells
        parts += [c.pos.tobytes(), c.src.tobytes(), c.src0.tobytes(), c.tail.tobytes()]
        parts += [c.rs_idx.tobytes(), c.head, c.used, c.n, c.rs_z]
        for il in rs.layers:
            parts += [rs.get_r_l(il).read_bytes(), rs.get_s_l(il).read_bytes()]
    return tuple(parts)


def memory_nbytes(mem: Any) -> int:
    return sum(mem.memory_breakdown().values())


@dataclass
class Outcome:
    """Counts of what happened to the hostile inputs of one family."""

    cases: int = 0
    refused: int = 0
    accepted: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, err: BaseException | None) -> None:
        self.cases += 1
        if err is None:
            self.accepted += 1
        else:
            self.refused += 1
            name = type(err).__name__
            self.errors[name] = self.errors.get(name, 0) + 1


class HostileFailure(AssertionError):
    pass


def expect_refused_unchanged(
    mem: Any, fn: Callable[[], Any], what: str, before: tuple | None = None, full: bool = True
) -> BaseException:
    """``fn`` must raise a PymemError and leave ``mem`` exactly as it was."""
    if before is None:
        before = snapshot(mem, full)
    try:
        fn()
    except PymemError as e:
        after = snapshot(mem, full)
        if after != before:
            raise HostileFailure(f"{what}: {type(e).__name__} raised but the memory changed") from e
        return e
    except Exception as e:  # an untyped error is a failure too
        raise HostileFailure(f"{what}: untyped {type(e).__name__}: {e}") from e
    raise HostileFailure(f"{what}: accepted")


# ------------------------------------------------------------------ real memories ---


def real_memory(kind: str) -> tuple[Any, dict]:
    """A pymem memory built like the recorded run of ``kind`` (kv, recurrent, hybrid)."""
    run_name, model = RUNS[kind]
    run = json.loads((DATA / "runs" / f"{run_name}.json").read_text())
    spec = spec_from_gguf(str(DATA / "models" / f"{model}.gguf"))
    mem = create_memory(spec, ContextParams.from_dict(run["context_params"]))
    return mem, run


def real_blobs(run: dict) -> list[tuple[str, int, bytes]]:
    """``(kind, seq_id, memory payload)`` of the recorded blobs, whole and per sequence."""
    arch = run["memory"]["arch"]
    out = []
    seen = set()
    for st in run["steps"]:
        if "state" in st and st["state"] not in seen:
            seen.add(st["state"])
            b = load_blob(st["state"])
            out.append(("whole", -1, b[4 + len(arch) :]))
        for s, bid in enumerate(st.get("seq_state", [])):
            if bid not in seen:
                seen.add(bid)
                out.append(("seq", s, load_blob(bid)[8:]))
    return out


def pick_blobs(run: dict) -> list[tuple[str, int, bytes]]:
    """The largest whole-state blob and the largest per-sequence blob of a run."""
    blobs = real_blobs(run)
    whole = max((b for b in blobs if b[0] == "whole"), key=lambda b: len(b[2]))
    seq = max((b for b in blobs if b[0] == "seq"), key=lambda b: len(b[2]))
    return [whole, seq]


def filled_pair(cfg: Config, seed: int = 1) -> Pair:
    """A pymem/spec pair with a few sequences decoded (and one seq op)."""
    pair = Pair(cfg, check_seq_states=2)
    rng = random.Random(seed)
    for s in range(min(cfg.n_seq_max, 3)):
        n = rng.randint(2, 5)
        pair.decode([[rng.randint(0, 63), p, [s], p == n - 1] for p in range(n)])
    return pair


SYNTH_CONFIGS = {
    "kv": Config("kv", layout="AA", n_seq_max=4, unified=False, kv_size=16, v_trans=True),
    "iswa": Config("iswa", layout="AWA", n_seq_max=4, kv_size=16, swa_size=8, n_swa=3, swa_type=1),
    "recurrent": Config("recurrent", layout="RR", n_seq_max=4, n_rs_seq=1),
    "hybrid": Config(
        "hybrid", layout="RARA", n_seq_max=4, unified=False, kv_size=16, v_trans=False
    ),
    "hybrid_iswa": Config(
        "hybrid_iswa",
        layout="RAWR",
        n_seq_max=4,
        kv_size=16,
        swa_size=8,
        n_swa=3,
        swa_type=2,
        n_rs_seq=2,
    ),
}


# ------------------------------------------------------------------ damaged blobs ---


def truncations(mem: Any, payload: bytes, seq_id: int, flags: int = 0, step: int = 1) -> Outcome:
    """Every prefix of ``payload`` (``step`` apart) must be refused without a change."""
    out = Outcome()
    before_full = snapshot(mem)
    before = snapshot(mem, full=False)
    for k in range(0, len(payload), step):
        err = expect_refused_unchanged(
            mem,
            lambda k=k: mem.state_read(payload[:k], seq_id, flags),
            f"truncated at {k}/{len(payload)}",
            before,
            full=False,
        )
        out.add(err)
    if snapshot(mem) != before_full:
        raise HostileFailure("after the truncations the whole-state blob differs")
    return out


def metadata_offsets(pair: Pair, payload: bytes, seq_id: int, flags: int) -> list[int]:
    """Byte offsets of ``payload`` that are not tensor data (headers, cells, row sizes)."""
    from .state import Reader

    spans: list[tuple[int, int]] = []
    Reader.record = spans
    try:
        import copy

        work = copy.deepcopy(pair.sp)
        work.state_read(payload, seq_id, flags)
    finally:
        Reader.record = None
    data = np.zeros(len(payload), dtype=bool)
    for off, n in spans:
        data[off : off + n] = True
    return np.flatnonzero(~data).tolist()


def flips(pair: Pair, payload: bytes, seq_id: int, n: int, seed: int, flags: int = 0) -> Outcome:
    """``n`` seeded random corruptions (1-3 bytes, half of them in the metadata).

    A refused blob must leave pymem unchanged; an accepted one must give the state the
    spec reaches from the same bytes (the memory is then reset to the baseline).
    """
    rng = random.Random(seed)
    out = Outcome()
    meta = metadata_offsets(pair, payload, seq_id, flags)
    base_blob = pair.pm.state_write(-1)
    for i in range(n):
        b = bytearray(payload)
        for _ in range(rng.randint(1, 3)):
            off = rng.choice(meta) if meta and rng.random() < 0.5 else rng.randrange(len(b))
            b[off] ^= rng.randint(1, 255)
        blob = bytes(b)
        before = snapshot(pair.pm, full=False)
        try:
            pair.pm.state_read(blob, seq_id, flags)
            err = None
        except PymemError as e:
            err = e
        except Exception as e:
            raise HostileFailure(f"flip {i} (seed {seed}): untyped {type(e).__name__}: {e}") from e
        out.add(err)
        if err is not None:
            if snapshot(pair.pm, full=False) != before:
                raise HostileFailure(
                    f"flip {i} (seed {seed}): {type(err).__name__} but the memory changed"
                )
            continue
        # accepted: the spec must accept the same bytes and land in the same state
        import copy

        work = copy.deepcopy(pair.sp)
        try:
            work.state_read(blob, seq_id, flags)
        except Exception as e:
            raise HostileFailure(
                f"flip {i} (seed {seed}): pymem accepted a blob the reference refuses ({type(e).__name__}: {e})"
            ) from e
        for s in [-1, *range(pair.cfg.n_seq_max)]:
            if work.state_write(s) != pair.pm.state_write(s):
                raise HostileFailure(
                    f"flip {i} (seed {seed}): accepted blob gives a different state (seq {s})"
                )
        pair.pm.state_read(base_blob)
        pair.sp.state_read(base_blob)
    return out


def peak_alloc(fn: Callable[[], Any]) -> tuple[int, BaseException | None]:
    """Peak traced allocation (bytes) while ``fn`` runs, and what it raised."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    err = None
    try:
        fn()
    except BaseException as e:
        err = e
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, err


def huge_count_blobs(kind: str, n_layer: int) -> Iterator[tuple[str, bytes]]:
    """Small blobs that declare enormous counts (cells, sequence ids per cell)."""
    big = 0xFFFFFFFF
    if kind in ("kv", "iswa", "hybrid", "hybrid_iswa"):
        yield "kv cell_count 2^32-1", struct.pack("<II", 1, big)
        yield "kv n_stream 2^32-1", struct.pack("<I", big)
        yield "kv cell with 2^32-1 seq ids", struct.pack("<IIiI", 1, 1, 0, big) + b"\0" * 64
        yield "kv n_layer 2^32-1", struct.pack("<IIiIiII", 1, 1, 0, 1, 0, 0, big)
    if kind in ("recurrent",):
        yield "rs cell_count 2^32-1", struct.pack("<I", big)
        yield "rs cell with 2^32-1 seq ids", struct.pack("<IiI", 1, 0, big) + b"\0" * 64
        yield "rs n_layer 2^32-1", struct.pack("<IIII", 0, 0, big, 0)
        yield "rs row size 2^64-1", struct.pack("<IIIiQ", 0, 0, n_layer, 0, 2**64 - 1)
