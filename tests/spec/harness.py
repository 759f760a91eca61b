"""Drive pymem and the spec side by side and compare them after every step.

This module is the test harness, not part of the spec: the spec's model modules
(``batch``, ``kv``, ``recurrent``, ``memory``, ``decode``) never import pymem. Here a
:class:`Pair` holds one pymem memory and the spec memory of the same configuration, runs
each operation on both, and checks op results, error kinds, cell placement, positions,
graph inputs (slot indices, K/V row indices, KQ masks, recurrent copy indices) and state
bytes (tensor data included: both sides receive the same synthetic "compute" writes).

With a prefix cache (``prefix_setup``), pymem's ``PrefixCache`` runs on the pymem memory
and the contract's model (``prefix``) beside it: each lookup / attach is checked against
the model's exact ways, the model then carries out pymem's way with the spec's own
operations (so the memories stay comparable), the attached sequence is read back
(``prefix.holds_exactly``) and the entries, eviction order and counters compared. Every
other operation follows the cache's protocol: it releases (or records) what it changed.

Documented departures of pymem from the reference, which the spec is configured to
model (see ``spec_for``): exactly transactional KV ``prepare``; ``seq_div`` records the
true displacement as the pending shift; a failed restore changes nothing; a fresh
recurrent cell gathers plane 0 even with a stale rollback index; asserts become typed
errors; a few arguments the reference silently misuses are refused (``REFUSED``).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pymem.batch import Batch, BatchAllocator
from pymem.errors import BatchError, ConfigError, PymemError, StateError
from pymem.hybrid import HybridISWAMemory, HybridMemory
from pymem.kv import KVCache
from pymem.kv.iswa import KVCacheISWA
from pymem.memory import MemoryStatus
from pymem.recurrent import RecurrentMemory
from pymem.reuse import (
    CheckpointPolicy,
    PrefixCache,
    apply_rollback,
    plan_rollback,
    restore_checkpoint,
)
from pymem.reuse import checkpoint as pm_checkpoint
from pymem.spec import LayerSpec, ModelSpec, NonCausalType, RopeSpec, RopeType, SWAType

from . import decode as sdec
from . import prefix as sprefix
from . import reuse as sreuse
from .batch import BatchIn, alloc_init, compat
from .common import SpecAbort, SpecBatchError, SpecError, SpecStateError
from .kv import KVConfig, KVLayer
from .memory import HybridMemory as SHybrid
from .memory import ISWAMemory as SISWA
from .memory import KVMemory as SKV
from .memory import RecurrentMemory as SRecurrent
from .memory import SpecMemory
from .recurrent import RSConfig

N_VOCAB = 64
# the spec's batch rule names -> pymem's BatchError.rule
RULES = {"position": "pos_memory", "gap": "pos_gap", "decreasing": "pos_decreasing"}
NON_CAUSAL = {
    "all": NonCausalType.ALL,
    "swa_only": NonCausalType.SWA_ONLY,
    "swa_full": NonCausalType.SWA_FULL,
}
KINDS = ("kv", "iswa", "recurrent", "hybrid", "hybrid_iswa")


@dataclass(frozen=True)
class Config:
    """One memory configuration. ``layout``: a letter per model layer, ``A`` full
    attention, ``W`` sliding-window attention, ``R`` recurrent."""

    kind: str
    layout: str = "AA"
    n_seq_max: int = 4
    unified: bool = True
    kv_size: int = 32
    swa_size: int = 16
    n_swa: int = 0
    swa_type: int = 0
    v_trans: bool = True
    type_k: str = "f16"
    type_v: str = "f16"
    n_rs_seq: int = 0
    n_ubatch: int = 8
    head_dim: int = 8
    v_dims: tuple[int, ...] = ()  # per attention layer V head dims (default head_dim)
    n_embd_r: int = 6
    n_embd_s: int = 10
    n_pos: int = 1  # positions per token (4: M-RoPE, cells carry ext)
    alibi: bool = False

    def describe(self) -> str:
        parts = [self.kind, self.layout, f"seqs={self.n_seq_max}"]
        parts.append("unified" if self.unified else "streams")
        if self.kind != "recurrent":
            parts.append(f"kv={self.kv_size}")
            parts.append(f"k={self.type_k}/v={self.type_v}{'/vT' if self.v_trans else ''}")
        if self.swa_type:
            parts.append(f"swa={SWAType(self.swa_type).name.lower()}:{self.n_swa}")
            if self.kind in ("iswa", "hybrid_iswa"):
                parts.append(f"swa_cells={self.swa_size}")
        if self.kind in ("recurrent", "hybrid", "hybrid_iswa"):
            parts.append(f"n_rs_seq={self.n_rs_seq}")
        parts.append(f"n_ubatch={self.n_ubatch}")
        if self.n_pos > 1:
            parts.append(f"n_pos={self.n_pos}")
        if self.alibi:
            parts.append("alibi")
        return " ".join(parts)


def _v_dim(cfg: Config, k: int) -> int:
    return cfg.v_dims[k % len(cfg.v_dims)] if cfg.v_dims else cfg.head_dim


def model_spec(cfg: Config) -> ModelSpec:
    layers = []
    k = 0
    for ch in cfg.layout:
        if ch == "R":
            layers.append(LayerSpec.ssm(cfg.n_embd_r, cfg.n_embd_s))
            continue
        rope = RopeSpec(n_rot=cfg.head_dim, rope_type=RopeType.NONE)
        layers.append(
            LayerSpec.attention(
                1, cfg.head_dim, swa=ch == "W", rope=rope, head_dim_v=_v_dim(cfg, k)
            )
        )
        k += 1
    swa = cfg.swa_type if cfg.n_swa > 0 else 0
    return ModelSpec(
        layers=tuple(layers),
        n_swa=cfg.n_swa if swa else 0,
        swa_type=SWAType(swa),
        n_pos_per_embd=cfg.n_pos,
        use_alibi=cfg.alibi,
        arch="spec",
    )


# ---------------------------------------------------------------------------- build ---


def build_pymem(cfg: Config) -> Any:
    spec = model_spec(cfg)
    common = dict(
        type_k=cfg.type_k, type_v=cfg.type_v, v_trans=cfg.v_trans, unified=cfg.unified,
        n_seq_max=cfg.n_seq_max,
    )  # fmt: skip
    attn = [il for il, ch in enumerate(cfg.layout) if ch in "AW"]
    full = [il for il, ch in enumerate(cfg.layout) if ch == "A"]
    slid = [il for il, ch in enumerate(cfg.layout) if ch == "W"]
    recr = [il for il, ch in enumerate(cfg.layout) if ch == "R"]

    def kv(layers: list[int], size: int, swa: bool) -> KVCache:
        return KVCache(
            spec, kv_size=size, filter=lambda il: il in layers,
            n_swa=cfg.n_swa if swa else 0, swa_type=SWAType(cfg.swa_type if swa else 0), **common,
        )  # fmt: skip

    def iswa() -> KVCacheISWA:
        return KVCacheISWA.from_parts(kv(full, cfg.kv_size, False), kv(slid, cfg.swa_size, True))

    def rs(layers: list[int] | None) -> RecurrentMemory:
        return RecurrentMemory(
            spec, n_seq_max=cfg.n_seq_max, n_rs_seq=cfg.n_rs_seq,
            filter=None if layers is None else (lambda il: il in layers),
        )  # fmt: skip

    if cfg.kind == "kv":
        return kv(attn, cfg.kv_size, cfg.swa_type != 0)
    if cfg.kind == "iswa":
        return iswa()
    if cfg.kind == "recurrent":
        return rs(None)
    if cfg.kind == "hybrid":
        return HybridMemory(kv(attn, cfg.kv_size, cfg.swa_type != 0), rs(recr))
    if cfg.kind == "hybrid_iswa":
        return HybridISWAMemory(iswa(), rs(recr))
    raise ValueError(cfg.kind)


def spec_for(cfg: Config, emulate_known_bugs: bool | None = None) -> SpecMemory:
    """The spec memory of ``cfg``, with pymem's documented departures switched on (and,
    with ``emulate_known_bugs``, the open bugs :func:`known_bugs` detects modelled)."""
    spec_layers = []
    k = 0
    v_max = 0
    for il, ch in enumerate(cfg.layout):
        if ch in "AW":
            spec_layers.append((il, ch, _v_dim(cfg, k)))
            v_max = max(v_max, _v_dim(cfg, k))
            k += 1

    def kvcfg(chars: str, size: int, swa: bool) -> KVConfig:
        return KVConfig(
            layers=[KVLayer(il, cfg.head_dim, vd) for il, ch, vd in spec_layers if ch in chars],
            kv_size=size,
            n_seq_max=cfg.n_seq_max,
            unified=cfg.unified,
            type_k=cfg.type_k,
            type_v=cfg.type_v,
            v_trans=cfg.v_trans,
            n_swa=cfg.n_swa if swa else 0,
            swa_type=cfg.swa_type if swa else 0,
            n_embd_v_gqa_max=v_max,
            n_pos_per_embd=cfg.n_pos,
            has_cell_ext=cfg.n_pos > 1,
            can_shift=cfg.n_pos == 1,
            use_alibi=cfg.alibi,
            transactional_prepare=True,
            true_div_shift=True,
        )

    def rscfg(layers: list[int]) -> RSConfig:
        return RSConfig(
            n_layer_total=len(cfg.layout),
            layers=layers,
            n_embd_r=cfg.n_embd_r,
            n_embd_s=cfg.n_embd_s,
            mem_size=max(1, cfg.n_seq_max),
            n_seq_max=cfg.n_seq_max,
            n_rs_seq=cfg.n_rs_seq,
            fresh_reads_plane0=True,
        )

    recr = [il for il, ch in enumerate(cfg.layout) if ch == "R"]
    mem = _spec_for(cfg, kvcfg, rscfg, recr)
    if emulate_known_bugs is None:
        emulate_known_bugs = EMULATE_OPEN_BUGS
    bugs = known_bugs() if emulate_known_bugs else {}
    if bugs.get("recurrent_negative_pos") and mem.rs is not None:
        mem.rs.cfg.pos_max_from_tail = True
    if bugs.get("iswa_unified_from_streams"):
        for part in (mem, getattr(mem, "attn", None)):
            if isinstance(part, SISWA):
                part.unified = part.base.n_stream == 1
    return mem


def _spec_for(cfg: Config, kvcfg, rscfg, recr: list[int]) -> SpecMemory:
    if cfg.kind == "kv":
        return SKV(kvcfg("AW", cfg.kv_size, cfg.swa_type != 0))
    if cfg.kind == "iswa":
        return SISWA(kvcfg("A", cfg.kv_size, False), kvcfg("W", cfg.swa_size, True))
    if cfg.kind == "recurrent":
        return SRecurrent(rscfg(list(range(len(cfg.layout)))))
    if cfg.kind == "hybrid":
        return SHybrid(SKV(kvcfg("AW", cfg.kv_size, cfg.swa_type != 0)), rscfg(recr))
    if cfg.kind == "hybrid_iswa":
        iswa = SISWA(kvcfg("A", cfg.kv_size, False), kvcfg("W", cfg.swa_size, True))
        return SHybrid(iswa, rscfg(recr))
    raise ValueError(cfg.kind)


# ------------------------------------------------------------------- pymem parts ---


def pm_kv_parts(mem: Any) -> dict[str, KVCache]:
    if isinstance(mem, KVCache):
        return {"kv": mem}
    if isinstance(mem, KVCacheISWA):
        return {"base": mem.kv_base, "swa": mem.kv_swa}
    if isinstance(mem, HybridMemory):
        return pm_kv_parts(mem.mem_attn)
    return {}


def pm_rs(mem: Any) -> RecurrentMemory | None:
    if isinstance(mem, RecurrentMemory):
        return mem
    if isinstance(mem, HybridMemory):
        return mem.mem_recr
    return None


def pm_ctx_parts(mem: Any, ctx: Any) -> tuple[dict[str, Any], Any]:
    if isinstance(mem, KVCache):
        return {"kv": ctx}, None
    if isinstance(mem, KVCacheISWA):
        return {"base": ctx.get_base(), "swa": ctx.get_swa()}, None
    if isinstance(mem, RecurrentMemory):
        return {}, ctx
    if isinstance(mem, HybridMemory):
        attn = ctx.get_attn()
        if isinstance(mem.mem_attn, KVCacheISWA):
            kv = {"base": attn.get_base(), "swa": attn.get_swa()}
        else:
            kv = {"kv": attn}
        return kv, ctx.get_recr()
    raise TypeError(type(mem))


# ------------------------------------------------------------------ known bugs ---

_KNOWN: dict[str, bool] | None = None

EMULATE_OPEN_BUGS = False
"""While a bug found by the property runs is open (reported, pinned by a strict xfail),
set this to True so the harness models it (probe below) and the random programs keep
exploring everything else. Off once the bugs are fixed: a regression must fail loudly.
All four bugs found so far (R1, I1, I2, K1) are fixed."""


def _pm_decode(mem: Any, items: list, n_seq_max: int, n_ubatch: int = 8) -> list:
    balloc = BatchAllocator(1)
    balloc.init(Batch.from_items(items), memory=mem, n_seq_max=n_seq_max, n_vocab=N_VOCAB)
    ctx = mem.init_batch(balloc, n_ubatch, False)
    ubs = []
    while True:
        ubs.append(ctx.get_ubatch())
        ctx.apply()
        if not ctx.next():
            return ubs


def known_bugs() -> dict[str, bool]:
    """Probe pymem for the open bugs found so far (tests/test_property_regressions.py).

    Each probe is the minimal program of one bug; True means pymem still has it. The
    harness then steers around that bug (or models it in the spec) so that the property
    runs keep finding new ones, and the regression test stays a strict xfail.
    """
    global _KNOWN
    if _KNOWN is not None:
        return _KNOWN
    res = {}
    # R1: recurrent seq_pos_max of a state at a negative position
    mem = build_pymem(Config("recurrent", layout="R", n_seq_max=2))
    try:
        _pm_decode(mem, [[1, 0, [1], True]], 2)
        mem.seq_add(1, -1, 2, -2)
        res["recurrent_negative_pos"] = mem.seq_pos_max(1) != -1
    finally:
        mem.close()
    # I1: iSWA seq_cp refused by the SWA cache after the base cache copied
    cfg = Config(
        "iswa", layout="AW", n_seq_max=8, unified=False, kv_size=4, swa_size=16, n_swa=3, swa_type=1
    )
    mem = build_pymem(cfg)
    try:
        _pm_decode(mem, [[1, 0, [6], False], [2, 1, [6], True]], 8)
        before = mem.state_write()
        try:
            mem.seq_cp(6, 3, 0, 3)
            res["iswa_partial_seq_cp"] = True
        except PymemError:
            res["iswa_partial_seq_cp"] = mem.state_write() != before
    finally:
        mem.close()
    # I2: iSWA split choice from the stream count instead of the unified flag
    cfg = Config(
        "iswa", layout="AW", n_seq_max=1, unified=False, kv_size=16, swa_size=8, n_swa=3, swa_type=1
    )
    mem = build_pymem(cfg)
    try:
        (ub,) = _pm_decode(mem, [[1, 0, [0], False], [2, 1, [0], True]], 1)
        res["iswa_unified_from_streams"] = not bool(ub.equal_seqs)
    finally:
        mem.close()
    # R2: a recurrent sequence's snapshot planes stay behind when another sequence's slot
    # search moves its cell; a rollback then claims exactness (rollback_reach > 0)
    cfg = Config("hybrid", layout="RRA", n_seq_max=4, n_rs_seq=2, n_ubatch=32, kv_size=16)
    mem = build_pymem(cfg)
    try:
        _pm_decode(mem, [[5, 0, [s], s == 3] for s in range(4)], 4, 32)
        _pm_decode(mem, [[9, 1, [1], False], [10, 2, [1], False], [11, 3, [1], True]], 4, 32)
        mem.seq_rm(0, -1, -1)
        mem.seq_rm(2, -1, -1)
        tail = int(mem.mem_recr.cells.tail[1])
        items = [[31, 0, [0], True], [54, 0, [2], True], [31, 1, [2], True], [30, 2, [2], True]]
        _pm_decode(mem, [*items, [38, 3, [2], True]], 4, 32)
        moved = int(mem.mem_recr.cells.tail[1]) != tail
        res["recurrent_moved_planes"] = moved and mem.mem_recr.rollback_reach(1) > 0
    finally:
        mem.close()
    _KNOWN = res
    return res


# ------------------------------------------------------------------ operations ---


class Mismatch(AssertionError):
    """pymem and the spec disagree."""


@dataclass
class Stats:
    steps: int = 0
    ops: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)

    def count(self, op: str, outcome: str) -> None:
        self.steps += 1
        self.ops[op] = self.ops.get(op, 0) + 1
        key = f"{op}:{outcome}"
        self.outcomes[key] = self.outcomes.get(key, 0) + 1

    def merge(self, other: Stats) -> None:
        self.steps += other.steps
        for k, v in other.ops.items():
            self.ops[k] = self.ops.get(k, 0) + v
        for k, v in other.outcomes.items():
            self.outcomes[k] = self.outcomes.get(k, 0) + v


def _mask_equal(a: np.ndarray, b: list) -> bool:
    bb = np.array(b, dtype=np.float64)
    aa = np.asarray(a, dtype=np.float64)
    if aa.shape != bb.shape:
        return False
    return bool(np.array_equal(aa, bb))


class Pair:
    """One pymem memory and its spec twin, stepped together."""

    def __init__(self, cfg: Config, *, check_seq_states: int | None = None) -> None:
        self.cfg = cfg
        self.pm = build_pymem(cfg)
        self.sp = spec_for(cfg)
        self.stats = Stats()
        self.log: list[str] = []  # the program so far, as calls
        self.blobs: list[tuple[int, int, bytes]] = []  # (seq_id, flags, blob) saved by steps
        # (pymem Checkpoint, spec checkpoint) pairs taken by steps, oldest first
        self.ckpts: list[tuple[Any, sreuse.SpecCheckpoint]] = []
        # how many per-sequence states to compare after each step (all when None)
        self.check_seq_states = check_seq_states
        self.step_no = 0
        # the prefix cache (pymem's and the spec's), set up by the first prefix step
        self.pc: PrefixCache | None = None
        self.spc: sprefix.SpecPrefixCache | None = None
        self.rows = sprefix.RowIndex()  # K rows decoded since, for holds_exactly
        self._disk_dir: str | None = None
        self._serving = False
        # recurrent states no longer checked by holds_exactly: a sequence's blob read as
        # the whole memory leaves cells with no sequence but a source row, and seq_add
        # can move a state below position 0 where seq_rm(s, -1, -1) does not reach it; a
        # fresh sequence then continues from that state (the reference's behaviour)
        self._stale_states = False
        # sequences whose recurrent cell another sequence's slot search moved since their
        # own last ubatch: their snapshot planes stayed behind (open bug R2, see
        # tests/test_property_regressions.py); a snapshot rollback of one reads them
        self._moved: set[int] = set()
        self.compare("init")

    def close(self) -> None:
        if self.pc is not None:
            for what, n in (("evicted", self.pc.n_evicted), ("spilled", self.pc.n_spilled)):
                key = f"prefix_cache:{what}"
                self.stats.outcomes[key] = self.stats.outcomes.get(key, 0) + n
            self.pc.close()
        if self._disk_dir is not None:
            shutil.rmtree(self._disk_dir, ignore_errors=True)
        self.pm.close()

    # ------------------------------------------------------------------ helpers ---

    def fail(self, what: str) -> None:
        prog = "\n".join(f"  {line}" for line in self.log[-40:])
        raise Mismatch(f"{what}\nconfig: {self.cfg.describe()}\nprogram (last steps):\n{prog}")

    def _run_spec(self, fn, *args, read_only: bool = False):
        """Run a spec op on a checkpoint: an abort (the reference would crash) rolls back.

        ``read_only`` ops (state writes) change nothing, so they need no checkpoint; the
        checkpoint copy is most of the harness's time otherwise.
        """
        if read_only:
            try:
                return ("ok", fn(*args))
            except SpecAbort as e:
                return ("abort", str(e))
            except SpecStateError as e:
                return ("state_error", str(e))
        saved = copy.deepcopy(self.sp)
        try:
            return ("ok", fn(*args))
        except SpecAbort as e:
            self.sp = saved
            return ("abort", str(e))
        except SpecStateError as e:
            self.sp = saved
            return ("state_error", str(e))

    def _run_pm(self, fn, *args):
        try:
            return ("ok", fn(*args))
        except StateError as e:
            return ("state_error", f"{type(e).__name__}: {e}")
        except PymemError as e:
            return ("error", f"{type(e).__name__}: {e}")

    def _agree(self, op: str, s_res: tuple, p_res: tuple, refused: bool = False) -> str:
        sk, sv = s_res
        pk, pv = p_res
        if sk == "ok" and pk == "ok":
            if sv != pv:
                self.fail(f"{op}: result {pv!r} (pymem) != {sv!r} (spec)")
            return "ok"
        if sk == "abort" and pk in ("error", "state_error"):
            return "refused"
        if sk == "state_error" and pk == "state_error":
            return "state_error"
        if sk == "ok" and pk == "error" and refused:
            return "refused"
        self.fail(f"{op}: pymem {pk} ({pv}) but spec {sk} ({sv})")
        return ""

    # --------------------------------------------------------------- comparison ---

    def compare(self, where: str) -> None:
        cfg = self.cfg
        sp, pm = self.sp, self.pm
        for s in range(cfg.n_seq_max):
            a = (pm.seq_pos_min(s), pm.seq_pos_max(s))
            b = (sp.seq_pos_min(s), sp.seq_pos_max(s))
            if a != b:
                self.fail(f"after {where}: seq {s} [pos_min, pos_max] pymem {a} != spec {b}")
        # KV cells, heads and pending shifts
        pparts = pm_kv_parts(pm)
        for name, skv in sp.kv_parts.items():
            pkv = pparts[name]
            for st in range(skv.n_stream):
                sc = skv.cells[st]
                pc = pkv.v_cells[st]
                ppos = pc.pos.tolist()
                if ppos != sc.pos:
                    self.fail(
                        f"after {where}: {name} stream {st} cell positions\n pymem {ppos}\n spec  {sc.pos}"
                    )
                for i in range(sc.size()):
                    if sc.pos[i] >= 0 and set(pc.seq_ids_of(i)) != sc.seq[i]:
                        self.fail(
                            f"after {where}: {name} stream {st} cell {i} sequences pymem "
                            f"{sorted(pc.seq_ids_of(i))} != spec {sorted(sc.seq[i])}"
                        )
                if pc.ext is not None:
                    for i in range(sc.size()):
                        if sc.pos[i] >= 0 and tuple(pc.ext[i].tolist()) != sc.ext[i]:
                            self.fail(
                                f"after {where}: {name} stream {st} cell {i} ext pymem "
                                f"{tuple(pc.ext[i].tolist())} != spec {sc.ext[i]}"
                            )
                if pc.shift.tolist() != sc.shift:
                    self.fail(
                        f"after {where}: {name} stream {st} shifts pymem {pc.shift.tolist()} != spec {sc.shift}"
                    )
                if bool(pc.has_shift) != sc.has_shift:
                    self.fail(f"after {where}: {name} stream {st} has_shift differs")
            if list(pkv.v_heads) != skv.heads:
                self.fail(
                    f"after {where}: {name} heads pymem {list(pkv.v_heads)} != spec {skv.heads}"
                )
        # recurrent cells
        prs = pm_rs(pm)
        if sp.rs is not None:
            srs = sp.rs
            c = prs.cells
            got = {
                "pos": c.pos.tolist(),
                "src": c.src.tolist(),
                "tail": c.tail.tolist(),
                "head": int(c.head),
                "used": int(c.used) % (1 << 32),
                "rs_idx": [int(x) for x in c.rs_idx[: cfg.n_seq_max]],
            }
            want = {
                "pos": [x.pos for x in srs.cells],
                "src": [x.src for x in srs.cells],
                "tail": [x.tail for x in srs.cells],
                "head": srs.head,
                "used": srs.used,
                "rs_idx": list(srs.rs_idx),
            }
            for key in got:
                if got[key] != want[key]:
                    self.fail(
                        f"after {where}: recurrent {key} pymem {got[key]} != spec {want[key]}"
                    )
            for i, cell in enumerate(srs.cells):
                seqs = {s for s in range(srs.size) if c.tail[s] == i}
                if seqs != cell.seq_id:
                    self.fail(
                        f"after {where}: recurrent cell {i} sequences pymem {seqs} != spec {cell.seq_id}"
                    )
        # state bytes: the whole memory, and per sequence
        self._compare_state(-1, 0, where)
        seqs = list(range(cfg.n_seq_max))
        if self.check_seq_states is not None and len(seqs) > self.check_seq_states:
            k = self.step_no % len(seqs)
            seqs = sorted({(k + j * 7) % len(seqs) for j in range(self.check_seq_states)})
        for s in seqs:
            self._compare_state(s, 0, where)
        if cfg.kind in ("iswa", "hybrid", "hybrid_iswa"):
            self._compare_state(-1, 1, where)
            self._compare_state(seqs[self.step_no % len(seqs)], 1, where)

    def _compare_state(self, seq_id: int, flags: int, where: str) -> None:
        s = self._run_spec(self.sp.state_write, seq_id, flags, read_only=True)
        p = self._run_pm(self.pm.state_write, seq_id, flags)
        if s[0] == "ok" and p[0] == "ok":
            if s[1] != p[1]:
                self.fail(
                    f"after {where}: state_write(seq_id={seq_id}, flags={flags}) bytes differ "
                    f"(pymem {len(p[1])} B, spec {len(s[1])} B, first difference at "
                    f"{_first_diff(p[1], s[1])})"
                )
            return
        if s[0] == "abort" and p[0] in ("error", "state_error"):
            return
        self.fail(f"after {where}: state_write(seq_id={seq_id}, flags={flags}): pymem {p} spec {s}")

    # -------------------------------------------------------------------- steps ---

    def _note(self, call: str) -> None:
        self.step_no += 1
        self.log.append(call)

    def seq_op(self, op: str, *args: int) -> str:
        if op == "seq_cp" and self._hits_iswa_partial_copy(*args):
            self.stats.count(op, "skipped (known bug I1)")
            return "skipped"
        self._note(f"{op}{args}")
        s = self._run_spec(getattr(self.sp, op), *args)
        p = self._run_pm(getattr(self.pm, op), *args)
        outcome = self._agree(op, s, p, refused=self._refused(op, args))
        self.stats.count(op, outcome)
        self.compare(f"{op}{args}")
        # the prefix cache's protocol: release what the operation may have changed (a
        # shift moves every sequence sharing the cells: in one stream, or a recurrent cell)
        rs = self.sp.rs
        if rs is not None and any(c.pos < 0 and c.seq_id for c in rs.cells):
            self._stale_states = True
        # (one stream per sequence: only a recurrent cell can be shared, after seq_cp)
        alone = not self.cfg.unified and self.sp.rs is None
        if op in ("seq_rm", "seq_cp") or (op in ("seq_add", "seq_div") and alone):
            s = args[1] if op == "seq_cp" else args[0]
            self._pc_release(None if s < 0 else [s])
        elif op == "seq_keep" and self.spc is not None:
            self._pc_release([s for s in sorted(self.spc.held) if s != args[0]])
        else:
            self._pc_release(None)
        return outcome

    def _hits_iswa_partial_copy(self, a: int, b: int, p0: int, p1: int) -> bool:
        """A cross-stream seq_cp that one iSWA cache calls full and the other partial."""
        if not EMULATE_OPEN_BUGS or not known_bugs()["iswa_partial_seq_cp"]:
            return False
        if len(self.sp.kv_parts) < 2 or self.cfg.unified:
            return False
        verdicts = set()
        for kv in self.sp.kv_parts.values():
            if not (0 <= a < len(kv.seq_to_stream) and 0 <= b < len(kv.seq_to_stream)):
                return False
            if kv.seq_to_stream[a] == kv.seq_to_stream[b]:
                return False
            size = kv.size()
            verdicts.add((p0 > 0 and p0 + 1 < size) or (p1 > 0 and p1 + 1 < size))
        return len(verdicts) > 1

    def _refused(self, op: str, args: tuple) -> bool:
        """Arguments pymem refuses on purpose although the reference accepts them."""
        # d <= 0: the reference divides by 0 or by a negative number
        return op == "seq_div" and args[3] < 1

    def clear(self, data: bool) -> str:
        self._note(f"clear({data})")
        self.sp.clear(data)
        self.pm.clear(data)
        self.stats.count("clear", "ok")
        self.compare("clear")
        self._pc_release(None)
        return "ok"

    def state_save(self, seq_id: int, flags: int = 0) -> str:
        self._note(f"state_save(seq_id={seq_id}, flags={flags})")
        s = self._run_spec(self.sp.state_write, seq_id, flags, read_only=True)
        p = self._run_pm(self.pm.state_write, seq_id, flags)
        outcome = self._agree("state_write", s, p)
        if outcome == "ok":
            self.blobs.append((seq_id, flags, p[1]))
        self.stats.count("state_write", outcome)
        return outcome

    def state_load(
        self, blob_index: int, dest: int, flags: int | None = None, cross: bool = False
    ) -> str:
        """Restore saved blob ``blob_index`` into ``dest`` (its own kind: whole blobs into
        the whole memory). ``cross``: read it the other way round (a whole blob into one
        sequence, a sequence's blob as the whole memory)."""
        src_seq, src_flags, blob = self.blobs[blob_index]
        flags = src_flags if flags is None else flags
        if cross:
            dest = dest if src_seq == -1 else -1
        elif src_seq == -1:
            dest = -1
        self._note(
            f"state_load(blob {blob_index} from seq {src_seq}, dest={dest}, flags={flags}, cross={cross})"
        )
        s = self._run_spec(self.sp.state_read, blob, dest, flags)
        p = self._run_pm(self.pm.state_read, blob, dest, flags)
        refused = (
            self.sp.rs is not None
            and dest >= 0
            and dest >= min(self.cfg.n_seq_max, self.sp.rs.size)
        )
        outcome = self._agree("state_read", s, p, refused=refused)
        self.stats.count("state_read", outcome)
        self.compare(f"state_load -> {dest}")
        self._pc_release(None if dest < 0 else [dest])
        if cross and outcome == "ok":
            self._stale_states = True
        return outcome

    # ------------------------------------------------------- checkpoints, rollback ---

    MAX_CKPTS = 8

    def take_checkpoint(self, seq_id: int) -> str:
        """``pymem.reuse.checkpoint()`` vs the spec's PARTIAL_ONLY state write + position."""
        self._note(f"checkpoint(seq_id={seq_id})")
        s = self._run_spec(sreuse.checkpoint, self.sp, seq_id, read_only=True)
        p = self._run_pm(pm_checkpoint, self.pm, seq_id)
        empty = s[0] == "state_error" and p[0] == "error"  # an empty sequence
        if s[0] == "ok" and p[0] == "ok":
            sck, pck = s[1], p[1]
            if (pck.seq_id, pck.pos) != (sck.seq_id, sck.pos) or pck.blob != sck.blob:
                self.fail(
                    f"checkpoint({seq_id}): pymem at {pck.pos} ({pck.nbytes} B) != spec at "
                    f"{sck.pos} ({len(sck.blob)} B) or the bytes differ"
                )
            self.ckpts.append((pck, sck))
            del self.ckpts[: -self.MAX_CKPTS]
            outcome = "ok"
        elif empty:
            outcome = "empty"
        else:
            outcome = self._agree("checkpoint", s, p)
        self.stats.count("checkpoint", outcome)
        return outcome

    def take_foreign_checkpoint(self, cfg: Config) -> str:
        """A checkpoint of sequence 0 after two tokens on another memory (configuration
        ``cfg``), added to this pair's checkpoints: restores and plans must refuse it (other
        sizes) or fail to read it (other layers) alike."""
        self._note(f"foreign checkpoint from {cfg.describe()}")
        other = Pair(cfg)
        try:
            other.decode([[1, 0, [0], False], [2, 1, [0], True]])
            outcome = other.take_checkpoint(0)
            if outcome == "ok":
                self.ckpts.append(other.ckpts[-1])
                del self.ckpts[: -self.MAX_CKPTS]
        except Mismatch as e:
            self.fail(f"foreign checkpoint: the other memory diverged: {e}")
        finally:
            other.close()
        self.stats.count("foreign_checkpoint", outcome)
        return outcome

    def restore_checkpoint(self, index: int, dest: int) -> str:
        """Restore checkpoint ``index`` into ``dest``: ``pymem.reuse.restore_checkpoint`` vs
        the spec's trim of its full-attention caches + PARTIAL_ONLY state read."""
        pck, sck = self.ckpts[index]
        self._note(f"restore_checkpoint(ckpt {index}: seq {sck.seq_id} at {sck.pos}, dest={dest})")
        s = self._run_spec(sreuse.restore, self.sp, dest, sck)
        p = self._run_pm(restore_checkpoint, self.pm, dest, pck)
        outcome = self._agree("restore_checkpoint", s, p)
        self.stats.count("restore_checkpoint", outcome)
        self.compare(f"restore_checkpoint -> {dest}")
        self._pc_release([dest])
        return outcome

    def rollback(self, seq_id: int, pos: int) -> str:
        """``plan_rollback`` + ``apply_rollback`` with ``seq_id``'s checkpoints, against the
        spec's own plan (tests/spec/reuse.py) carried out with its own ops."""
        mine = [(p, s) for p, s in self.ckpts if s.seq_id == seq_id]
        self._note(
            f"rollback(seq_id={seq_id}, pos={pos}) with checkpoints at {[s.pos for _, s in mine]}"
        )
        s_plan = sreuse.plan_rollback(self.sp, seq_id, pos, [s for _, s in mine])
        plan = plan_rollback(self.pm, seq_id, pos, [p for p, _ in mine])
        got = (plan.kind, plan.resume_from)
        want = s_plan[:2]
        if got != want:
            self.fail(f"rollback({seq_id}, {pos}): pymem plan {got} ({plan.reason}) != spec {want}")
        if plan.kind == "checkpoint":
            pick = next(s for p, s in mine if p is plan.checkpoint)
            if pick is not s_plan[2]:
                self.fail(
                    f"rollback({seq_id}, {pos}): pymem restores the checkpoint at "
                    f"{plan.checkpoint.pos}, spec the one at {s_plan[2].pos}"
                )
        s = self._run_spec(sreuse.apply_rollback, self.sp, seq_id, pos, s_plan)
        p = self._run_pm(apply_rollback, self.pm, plan)
        if s[0] == "state_error" and p[0] == "error" and plan.kind in ("trim", "snapshot"):
            outcome = "stale"  # seq_rm refused: pymem's RangeError, the spec's refusal
        else:
            outcome = self._agree("apply_rollback", s, p)
        self.stats.count("rollback", f"{plan.kind}:{outcome}")
        self.compare(f"rollback({seq_id}, {pos})")
        if (
            plan.kind == "snapshot"
            and seq_id in self._moved
            and known_bugs()["recurrent_moved_planes"]
        ):
            self._stale_states = True  # open bug R2: the planes stayed in the old cell
        if self.pc is not None and plan.kind != "none":
            held = self.spc.held.get(seq_id)
            if (
                outcome == "ok" and plan.kind in ("trim", "snapshot") and held is not None
                and len(held) >= pos and self.sp.seq_pos_max(seq_id) == pos - 1
            ):  # fmt: skip
                self._pc_record(seq_id, held[:pos])  # the cache learns the shorter history
            else:
                self._pc_release([seq_id])
        if outcome == "ok" and self.sp.seq_pos_max(seq_id) >= p[1]:
            # nothing may be left where decoding resumes (a sequence with gaps may end
            # earlier than resume - 1: its positions were never contiguous)
            self.fail(
                f"rollback({seq_id}, {pos}): {plan.kind} resumes at {p[1]} but the sequence "
                f"ends at {self.sp.seq_pos_max(seq_id)}"
            )
        return plan.kind

    # ------------------------------------------------------------- prefix cache ---

    def prefix_setup(self, policy: sprefix.Policy, budget: int, disk: str) -> None:
        """Put a ``PrefixCache`` on pymem's memory and the contract's model beside it.

        ``disk``: "none", "keep" (a disk tier with room for every evicted entry) or
        "drop" (a disk tier of 0 bytes: every evicted entry is dropped)."""
        self._note(f"prefix_setup({policy}, budget={budget}, disk={disk!r})")
        if disk != "none":
            self._disk_dir = tempfile.mkdtemp(prefix="pymem-spec-prefix-")
        self.pc = PrefixCache(
            self.pm,
            policy=CheckpointPolicy(
                interval=policy.interval, before_last_turn=policy.before_last_turn,
                before_last_token=policy.before_last_token,
                branch_points=policy.branch_points, n_batch=policy.n_batch,
            ),
            budget_bytes=budget, disk_dir=self._disk_dir,
            disk_budget_bytes=1 << 30 if disk == "keep" else 0,
            fingerprint="spec" if disk != "none" else "",
        )  # fmt: skip
        self.spc = sprefix.SpecPrefixCache(policy, budget, disk)

    def _index_rows(self, ub: Any) -> None:
        """Remember which token each K row of this ubatch is (first layer of each cache)."""
        for name, skv in self.sp.kv_parts.items():
            if not skv.cfg.layers:
                continue
            il, kr = skv.cfg.layers[0].il, skv.k_row[0]
            for i in range(ub.n_tokens):
                tok = ub.token[i] if ub.token is not None else -1
                row = sdec.kv_row("k", il, ub.pos[i], ub.seq_id[i][0], tok, kr)
                self.rows.add(name, row, ub.pos[i], tok)

    def _pc_release(self, seqs: list[int] | None) -> None:
        """``release`` on both sides (None: every tracked sequence)."""
        if self.pc is None:
            return
        assert self.spc is not None
        for s in sorted(self.spc.held) if seqs is None else seqs:
            if s in self.spc.held or self.pc.held(s) is not None:
                self.pc.release(s)
                self.spc.release(self.sp, s)
        self._compare_prefix("release")

    def _pc_record(self, seq_id: int, toks: tuple) -> None:
        assert self.pc is not None and self.spc is not None
        p = self._run_pm(self.pc.record, seq_id, list(toks))
        if p[0] != "ok":
            self.fail(f"record({seq_id}, {list(toks)}): pymem {p}")
        self.spc.record(self.sp, seq_id, toks)
        self._compare_prefix(f"record({seq_id})")

    def _pc_after_decode(self, items: list, opaque: bool) -> None:
        """A decode behind the cache's back: a tracked sequence that only continued (one
        sequence per token, positions right after what it held) is recorded, the others
        are released."""
        assert self.spc is not None
        seqs = sorted({s for it in items for s in it[2]})
        for s in seqs:
            held = self.spc.held.get(s)
            if held is None:
                continue
            mine = [it for it in items if s in it[2]]
            ok = not opaque and all(list(it[2]) == [s] for it in mine)
            ok = ok and [it[1] for it in mine] == list(range(len(held), len(held) + len(mine)))
            ok = ok and self.sp.seq_pos_max(s) == len(held) + len(mine) - 1
            if ok:
                self._pc_record(s, held + tuple(it[0] for it in mine))
            else:
                self._pc_release([s])

    def _pc_ready(self) -> bool:
        """Pending K-shifts applied (as a runtime's memory_update would); False when the
        memory cannot apply them (M-RoPE): the cache would copy streams behind them."""
        self.update()
        return not any(kv.get_has_shift() or kv.sc_ssrc for kv in self.sp.kv_parts.values())

    def _compare_prefix(self, where: str) -> None:
        """The stored entries (position, tier, sharers, RAM bytes), the eviction order,
        the budget, the counters and what each sequence holds, pymem against the model."""
        pc, spc = self.pc, self.spc
        assert pc is not None and spc is not None
        got = [(e.pos, e.tier, e.shared, e.nbytes if e.tier == "ram" else 0) for e in pc.entries()]
        want = [
            (e.pos, e.tier, spc.shared(e), e.nbytes if e.tier == "ram" else 0)
            for e in spc.entries()
        ]
        if got != want:
            self.fail(
                f"after {where}: prefix entries (pos, tier, shared, bytes) pymem {got} != spec {want}"
            )
        order = [e.pos for e in spc.eviction_order()]
        if pc.eviction_order() != order:
            self.fail(f"after {where}: eviction order pymem {pc.eviction_order()} != spec {order}")
        ram = sum(e.nbytes for e in spc.ram)
        if pc.bytes_ram != ram or pc.bytes_ram > pc.budget_bytes:
            self.fail(
                f"after {where}: RAM bytes pymem {pc.bytes_ram}, spec {ram}, budget {pc.budget_bytes}"
            )
        files = [e.path for e in pc.entries() if e.tier == "disk"]
        if any(f is None or not os.path.exists(f) for f in files) or pc.bytes_disk != sum(
            os.path.getsize(f) for f in files if f
        ):
            self.fail(f"after {where}: disk entries {files} do not add up to {pc.bytes_disk} B")
        counts = (pc.n_taken, pc.n_evicted, pc.n_spilled, pc.n_refused)
        if counts != (spc.n.taken, spc.n.evicted, spc.n.spilled, spc.n.refused):
            self.fail(
                f"after {where}: taken/evicted/spilled/refused pymem {counts} != spec {spc.n}"
            )
        held = {s: tuple(int(t) for t in pc.held(s)) for s in pc.held_seqs()}  # type: ignore[union-attr]
        if held != spc.held:
            self.fail(f"after {where}: held tokens pymem {held} != spec {spc.held}")

    def _check_match(self, op: str, m: Any, n_common: int, ways: list) -> sprefix.Way:
        """pymem's match: the spec's n_common, the longest exact way, one of the cheapest."""
        best = sprefix.SpecPrefixCache.best(ways)
        got = sprefix.Way(m.n_reuse, m.source, m.how, m.src_seq, m.pos)
        if m.n_common != n_common:
            self.fail(f"{op}: n_common pymem {m.n_common} != spec {n_common}")
        if got not in ways or m.n_reuse != best[0].n_reuse:
            self.fail(
                f"{op}: pymem reuses {got} ({m.reason}); the spec's longest exact ways are "
                f"{best}, all: {sorted(set(ways), key=lambda w: -w.n_reuse)}"
            )
        if sprefix.RANK[m.source, m.how] != sprefix.RANK[best[0].source, best[0].how]:
            self.fail(f"{op}: pymem takes {got}, a cheaper way is {best[0]}")
        return got

    def prefix_lookup(self, toks: tuple, seq_id: int) -> str:
        assert self.pc is not None and self.spc is not None
        self._note(f"prefix.lookup({list(toks)}, seq_id={seq_id})")
        n_common, ways = self.spc.ways(self.sp, toks, seq_id)
        p = self._run_pm(self.pc.lookup, list(toks), seq_id)
        if p[0] != "ok":
            self.fail(f"lookup: pymem {p}")
        got = self._check_match("lookup", p[1], n_common, ways)
        self.stats.count("prefix_lookup", f"{got.source}:{got.how}")
        return got.how

    def prefix_attach(self, seq_id: int, toks: tuple, kind: str, serve: bool = True) -> str:
        """``attach`` on both sides, checked against the contract; with ``serve`` the
        chunks are then decoded and recorded, as a runtime does."""
        assert self.pc is not None and self.spc is not None
        if not self._pc_ready():
            self.stats.count("prefix_attach", "skipped (pending shift)")
            return "skipped"
        self._note(f"prefix.attach({seq_id}, {list(toks)}, {kind!r}, serve={serve})")
        spc = self.spc
        if seq_id in spc.held and not spc.current(self.sp, seq_id):
            spc.release(self.sp, seq_id)  # what attach does with a stale sequence
        p = self._run_pm(self.pc.attach, seq_id, list(toks), kind)
        if p[0] != "ok":
            self.fail(f"attach: pymem {p}")
        att = p[1]
        for why in att.refused:
            # pymem refused the entry of its best way (the memory could not take it:
            # no free cells, say) and dropped it: the spec's best way must fail alike
            n_common, ways = spc.ways(self.sp, toks, seq_id)
            best = spc.best(ways)[0]
            entry = spc.entry_of(toks[: best.pos + 1]) if best.pos >= 0 else None
            trial = copy.deepcopy(self.sp)
            try:
                spc_trial = copy.deepcopy(spc)
                spc_trial.carry_out(trial, seq_id, toks, best)
                refused = False
            except SpecStateError:
                refused = True
            if entry is None or not refused:
                self.fail(f"attach: pymem refused an entry ({why}); the spec carries out {best}")
            spc.drop(entry)
            spc.n.refused += 1
        n_common, ways = spc.ways(self.sp, toks, seq_id)
        way = self._check_match("attach", att.match, n_common, ways)
        s = self._run_spec(spc.attach, self.sp, seq_id, toks, kind, way, n_common)
        if s[0] != "ok":
            self.fail(f"attach: the spec cannot carry out {way}: {s}")
        got = (att.resume_from, att.chunks, att.checkpoints)
        if got != s[1]:
            self.fail(f"attach: pymem (resume, chunks, checkpoints) {got} != spec {s[1]}")
        self.compare(f"attach({seq_id})")
        self._compare_prefix(f"attach({seq_id})")
        if (
            way.how == "snapshot"
            and seq_id in self._moved
            and known_bugs()["recurrent_moved_planes"]
        ):
            self._stale_states = True  # open bug R2: the planes stayed in the old cell
        self._check_holds(seq_id, toks[: att.resume_from], f"attach ({way})")
        self.stats.count("prefix_attach", f"{way.source}:{way.how}")
        if not serve:
            return way.how
        self._serving = True
        try:
            for p0, p1 in att.chunks:
                items = [[toks[q], q, [seq_id], q == p1 - 1] for q in range(p0, p1)]
                if self.decode(items) != 0:
                    break
                self._pc_record(seq_id, toks[:p1])
        finally:
            self._serving = False
        self._check_holds(seq_id, spc.held.get(seq_id, ()), "serve")
        return way.how

    def prefix_damage(self, k: int) -> str:
        """Flip a byte in the middle of disk entry ``k``'s file (pymem checks a checksum
        when it reads one back: a restore from it must be refused, the memory unchanged)."""
        assert self.pc is not None and self.spc is not None
        ents = self.pc.entries()
        model = self.spc.entries()
        # (a second flip of the same byte would repair the file)
        disk = [i for i, e in enumerate(ents) if e.tier == "disk" and not model[i].damaged]
        if not disk:
            return "none"
        i = disk[k % len(disk)]
        path = ents[i].path
        assert path is not None
        self._note(f"prefix.damage(entry at {ents[i].pos}, {os.path.basename(path)})")
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x41]))
        model[i].damaged = True
        self.stats.count("prefix_damage", "ok")
        return "ok"

    def _check_holds(self, seq_id: int, toks: tuple, where: str) -> None:
        why = sprefix.holds_exactly(
            self.sp, seq_id, toks, self.rows, check_states=not self._stale_states
        )
        if why:
            self.fail(f"after {where}: sequence {seq_id} does not hold exactly {list(toks)}: {why}")

    def prefix_restore_entry(self, seq_id: int, pos: int) -> str:
        assert self.pc is not None and self.spc is not None
        self._note(f"prefix.restore_entry({seq_id}, {pos})")
        p = self._run_pm(self.pc.restore_entry, seq_id, pos)
        s = self._run_spec(self.spc.restore_entry, self.sp, seq_id, pos)
        same = p[0] == s[0] or (p[0] == "error" and s[0] == "abort")
        if not same or (p[0] == "ok" and p[1] != s[1]):
            self.fail(f"restore_entry({seq_id}, {pos}): pymem {p} != spec {s}")
        self.compare(f"restore_entry({seq_id}, {pos})")
        self._compare_prefix(f"restore_entry({seq_id}, {pos})")
        if p[0] == "ok":
            self._check_holds(seq_id, self.spc.held[seq_id], "restore_entry")
        self.stats.count("prefix_restore_entry", p[0])
        return p[0]

    def update(self) -> bool:
        """``memory_update``: init_update + apply; True when something was applied.

        The pending per-cell shifts (the K-shift graph input) are compared first.
        """
        pparts = pm_kv_parts(self.pm)
        for name, skv in self.sp.kv_parts.items():
            got = pparts[name].k_shift().tolist()
            if got != skv.k_shift_input():
                self.fail(f"update: {name} K-shift input pymem {got} != spec {skv.k_shift_input()}")
        st = self._run_spec(self.sp.update)
        uctx = self.pm.init_update()
        status = uctx.get_status()
        if st[0] == "abort":
            if status == MemoryStatus.SUCCESS:
                try:
                    uctx.apply()
                except PymemError:
                    return False
                self.fail(f"update: spec aborts ({st[1]}) but pymem applied it")
            return False
        if status not in (MemoryStatus.SUCCESS, MemoryStatus.NO_UPDATE):
            self.fail(f"update: pymem status {status.name}")
        did = status == MemoryStatus.SUCCESS
        if did:
            uctx.apply()
        if did != st[1]:
            self.fail(f"update: pymem applied={did}, spec={st[1]}")
        return did

    def decode(
        self,
        items: list,
        *,
        embd_all: bool = False,
        auto_pos: bool = False,
        sections: list[tuple[int, ...]] | None = None,
    ) -> int:
        """Decode ``items`` (``[token, pos, [seq ids], output]``); with ``sections`` an
        embedding batch whose tokens carry those ``n_pos`` positions instead."""
        cfg = self.cfg
        n_pos = cfg.n_pos
        self._note(
            f"decode({items!r}, embd_all={embd_all}, auto_pos={auto_pos}, sections={sections})"
        )
        batch_in = BatchIn.from_items(items)
        flat = None
        if sections is not None:
            n = len(items)
            flat = [sections[i][j] for j in range(n_pos) for i in range(n)]
            batch_in.token = None
            batch_in.embd = [[0.25] * 4 for _ in range(n)]
            batch_in.pos = list(flat)
        if auto_pos:
            batch_in.pos = None
        # --- validation
        try:
            toks = compat(batch_in, self.sp, cfg.n_seq_max, n_pos)
            alloc_s = alloc_init(
                toks, self.sp, n_seq_max=cfg.n_seq_max, n_vocab=N_VOCAB,
                n_pos_per_embd=n_pos, output_all=embd_all,
            )  # fmt: skip
            s_err = None
        except SpecBatchError as e:
            s_err = e
        except SpecAbort as e:
            s_err = e
        if sections is None:
            batch = Batch(
                np.array([it[0] for it in items], dtype=np.int32),
                pos=None if auto_pos else np.array([it[1] for it in items], dtype=np.int32),
                seq_id=[list(it[2]) for it in items],
                output=np.array([bool(it[3]) for it in items], dtype=np.bool_),
            )
        else:
            batch = Batch.from_embd(
                np.full((len(items), 4), 0.25, dtype=np.float32),
                pos=None if auto_pos else np.array(flat, dtype=np.int32),
                seq_id=[list(it[2]) for it in items],
                output=np.array([bool(it[3]) for it in items], dtype=np.bool_),
            )
        balloc = BatchAllocator(n_pos)
        try:
            balloc.init(
                batch, memory=self.pm, n_seq_max=cfg.n_seq_max, n_vocab=N_VOCAB, n_embd=4,
                output_all=embd_all,
            )  # fmt: skip
            p_err = None
        except PymemError as e:
            p_err = e
        if s_err is None and isinstance(p_err, BatchError) and any(t.pos[0] < 0 for t in toks):
            # pymem refuses negative positions; the reference stores them (a cell at -1
            # then reads as empty)
            self.stats.count("decode", "refused")
            self.compare("decode (negative position refused)")
            return -1
        if (s_err is None) != (p_err is None):
            self.fail(f"decode: batch validation pymem {p_err!r} vs spec {s_err!r}")
        if isinstance(s_err, SpecBatchError) and isinstance(p_err, BatchError):
            # the first failing check must be the same one (the reference's order)
            want = RULES.get(s_err.rule, s_err.rule)
            got = getattr(p_err, "rule", None)
            if got != want:
                self.fail(
                    f"decode: batch refused by rule {got!r} ({p_err}) but the spec's first failing check is {want!r} ({s_err})"
                )
        if s_err is not None:
            if isinstance(p_err, BatchError) or isinstance(s_err, SpecAbort):
                self.stats.count("decode", "invalid")
                self.compare("decode (invalid batch)")
                return -1
            self.fail(f"decode: pymem raised {p_err!r} for an invalid batch")
        # --- update, plan
        self.update()
        s_ctx = self._run_spec(self.sp.init_batch, alloc_s, cfg.n_ubatch, embd_all)
        try:
            p_ctx = self.pm.init_batch(balloc, cfg.n_ubatch, embd_all)
        except PymemError as e:
            # pymem refuses n_ubatch <= n_keep_tail up front (a ConfigError); the reference
            # asserts only once split_equal has a sequence set to emit
            keep_tail = cfg.n_rs_seq + 1 if cfg.n_rs_seq else 0
            refused = isinstance(e, ConfigError) and not embd_all and 0 < cfg.n_ubatch <= keep_tail
            if s_ctx[0] == "abort" or refused:
                self.stats.count("decode", "refused")
                self.compare("decode (refused)")
                return -3
            self.fail(f"decode: pymem init_batch raised {e!r}, spec {s_ctx}")
        if s_ctx[0] == "abort":
            self.fail(f"decode: spec aborts in init_batch ({s_ctx[1]}) but pymem planned it")
        s_ok = s_ctx[1] is not None
        p_ok = p_ctx.get_status() == MemoryStatus.SUCCESS
        if s_ok != p_ok:
            self.fail(
                f"decode: init_batch pymem {p_ctx.get_status().name} vs spec {'ok' if s_ok else 'failed'}"
            )
        if not s_ok:
            if self.update():
                s_ctx = self._run_spec(self.sp.init_batch, alloc_s, cfg.n_ubatch, embd_all)
                p_ctx = self.pm.init_batch(balloc, cfg.n_ubatch, embd_all)
                s_ok = s_ctx[1] is not None
                p_ok = p_ctx.get_status() == MemoryStatus.SUCCESS
                if s_ok != p_ok:
                    self.fail("decode: retried init_batch differs")
            if not s_ok:
                self.stats.count("decode", "no_slot")
                self.compare("decode (no slot)")
                return 1
        # --- ubatches
        tails = [c.tail for c in self.sp.rs.cells] if self.sp.rs is not None else []
        sctx = s_ctx[1]
        k = 0
        while True:
            sub = sctx.ubatch
            pub = p_ctx.get_ubatch()
            self._compare_ubatch(k, sub, pub)
            self._cur_spec_ubatch = sub
            sctx.apply()
            p_ctx.apply()
            s_inputs = sdec.spec_compute(self.sp, sctx)
            if self.pc is not None:
                self._index_rows(sub)
            self._pm_compute(p_ctx, pub, s_inputs, k)
            more_s = sctx.next()
            more_p = p_ctx.next()
            if more_s != more_p:
                self.fail(f"decode: ubatch count differs after ubatch {k}")
            k += 1
            if not more_s:
                break
        self.stats.count("decode", "ok")
        self.compare("decode")
        if tails:
            mine = {sid for it in items for sid in it[2]}
            now = [c.tail for c in self.sp.rs.cells]
            self._moved |= {i for i, (a, b) in enumerate(zip(tails, now)) if a != b and a >= 0}
            self._moved -= mine
        if self.pc is not None and not self._serving:
            self._pc_after_decode(items, auto_pos or sections is not None)
        return 0

    def _compare_ubatch(self, k: int, sub: Any, pub: Any) -> None:
        got = (
            pub.n_tokens, pub.n_seq_tokens, pub.n_seqs, pub.n_seqs_unq, bool(pub.equal_seqs),
            pub.batch_idxs.tolist(), pub.seq_id_unq.tolist(),
        )  # fmt: skip
        want = (
            sub.n_tokens, sub.n_seq_tokens, sub.n_seqs, sub.n_seqs_unq, sub.equal_seqs,
            sub.batch_idxs, sub.seq_id_unq,
        )  # fmt: skip
        if got != want:
            self.fail(f"decode: ubatch {k} pymem {got} != spec {want}")
        pseq = [[int(x) for x in row[: pub.n_seq_id[i]]] for i, row in enumerate(pub.seq_id)]
        if pseq != sub.seq_id or pub.pos.tolist() != sub.pos:
            self.fail(f"decode: ubatch {k} seq ids / positions differ")

    def _pm_compute(self, p_ctx: Any, ub: Any, s_inputs: dict, k: int) -> None:
        """Check the graph inputs against the spec's, then write the same synthetic data."""
        kv_ctxs, rs_ctx = pm_ctx_parts(self.pm, p_ctx)
        n = ub.n_tokens
        toks = ub.token.tolist() if ub.token is not None else [-1] * n
        pos = ub.pos[:n].tolist()
        seq0 = [int(x) for x in ub.seq_id[:, 0]]
        for name, kctx in kv_ctxs.items():
            si = s_inputs[name]
            sinfo = kctx.get_sinfo()
            if sinfo.idxs.tolist() != si["idxs"] or sinfo.strm.tolist() != si["strm"]:
                self.fail(
                    f"decode: ubatch {k} {name} slot pymem {sinfo.strm.tolist()}:{sinfo.idxs.tolist()} "
                    f"!= spec {si['strm']}:{si['idxs']}"
                )
            k_idxs = kctx.get_k_idxs()
            if k_idxs.tolist() != si["k_idxs"] or kctx.get_v_idxs().tolist() != si["v_idxs"]:
                self.fail(f"decode: ubatch {k} {name} k_idxs / v_idxs differ")
            if kctx.get_n_kv() != si["n_kv"]:
                self.fail(
                    f"decode: ubatch {k} {name} n_kv pymem {kctx.get_n_kv()} != spec {si['n_kv']}"
                )
            skv = self.sp.kv_parts[name]
            want_mask = skv.kq_mask(self._spec_ubatch_for_mask(), si["n_kv"])
            if not _mask_equal(kctx.get_kq_mask(causal_attn=True), want_mask):
                self.fail(f"decode: ubatch {k} {name} KQ mask differs")
            # one of the non-causal variants, in turn
            nct = ("all", "swa_only", "swa_full")[self.step_no % 3]
            saved = skv.cfg.non_causal_type
            skv.cfg.non_causal_type = nct
            try:
                want_nc = skv.kq_mask(self._spec_ubatch_for_mask(), si["n_kv"], causal_attn=False)
            finally:
                skv.cfg.non_causal_type = saved
            got_nc = kctx.get_kq_mask(causal_attn=False, non_causal_type=NON_CAUSAL[nct])
            if not _mask_equal(got_nc, want_nc):
                self.fail(f"decode: ubatch {k} {name} non-causal ({nct}) KQ mask differs")
            kv = kctx.kv
            el = kv.type_v.type_size
            for layer in kv.layers:
                il = layer.il
                krow = layer.k.row_size
                kdata = np.frombuffer(
                    b"".join(
                        sdec.kv_row("k", il, pos[i], seq0[i], toks[i], krow) for i in range(n)
                    ),
                    dtype=np.uint8,
                ).reshape(n, krow)
                layer.k.write_rows(k_idxs, kdata)
                if layer.v is None:
                    continue
                vrow = el * layer.n_embd_v_gqa if kv.v_trans else layer.v.row_size
                rows = [sdec.kv_row("v", il, pos[i], seq0[i], toks[i], vrow) for i in range(n)]
                if not kv.v_trans:
                    layer.v.write_rows(
                        k_idxs, np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(n, vrow)
                    )
                else:
                    v_idxs = kctx.get_v_idxs()
                    nv = kv.n_embd_v_gqa_max
                    for i in range(n):
                        for j in range(layer.n_embd_v_gqa):
                            layer.v.write_bytes(
                                rows[i][j * el : (j + 1) * el], int(v_idxs[i * nv + j]) * el
                            )
        if rs_ctx is not None:
            si = s_inputs["rs"]
            got = (
                rs_ctx.get_head(),
                rs_ctx.get_n_rs(),
                rs_ctx.get_rs_z(),
                rs_ctx.s_copy().tolist(),
            )
            want = (si["head"], si["n_rs"], si["rs_z"], si["s_copy"])
            if got != want:
                self.fail(
                    f"decode: ubatch {k} recurrent inputs (head, n_rs, rs_z, s_copy) pymem {got} != spec {want}"
                )
            rs = pm_rs(self.pm)

            def get_row(kind: str, il: int, row: int) -> bytes:
                t = rs.get_r_l(il) if kind == "r" else rs.get_s_l(il)
                return t.read_rows(np.array([row], dtype=np.int64)).tobytes()

            def set_row(kind: str, il: int, row: int, b: bytes) -> None:
                t = rs.get_r_l(il) if kind == "r" else rs.get_s_l(il)
                t.write_rows(
                    np.array([row], dtype=np.int64), np.frombuffer(b, dtype=np.uint8).reshape(1, -1)
                )

            sub_ub = self._spec_ubatch_for_mask()
            sdec.recurrent_compute(
                sub_ub,
                got[0],
                got[1],
                got[2],
                got[3],
                rs.size,
                rs.n_rs_seq,
                list(rs.layers),
                get_row,
                set_row,
            )

    def _spec_ubatch_for_mask(self) -> Any:
        return self._cur_spec_ubatch


def _first_diff(a: bytes, b: bytes) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


__all__ = [
    "KINDS",
    "Config",
    "Mismatch",
    "Pair",
    "SpecError",
    "Stats",
    "build_pymem",
    "model_spec",
    "spec_for",
]
