"""The five memory types behind one interface, composed as the reference composes them.

* ``KVMemory``: one ``llama_kv_cache`` (split_simple with one stream, else
  split_equal(sequential=True)).
* ``ISWAMemory``: base + SWA caches; unified tries split_simple first, then (and always
  when not unified) split_equal(sequential=not unified). Positions come from the SWA cache.
* ``RecurrentMemory``: split_seq for embd_all, else split_equal(True, n_rs_seq+1 or 0).
* ``HybridMemory`` / ``HybridISWAMemory``: recurrent + attention (plain or iSWA);
  split_seq for embd_all, else split_equal(not unified, n_keep_tail); prepare runs on
  the recurrent part first; seq_rm asks the recurrent part first; pos_min is the max of
  the parts' minimums and pos_max the min of their maximums.

State layouts are plain concatenations (``[KV(base)] [KV(swa)]``, ``[KV] [RS]``, ...).
"""

from __future__ import annotations

import copy

from .batch import Alloc, UBatch
from .common import (
    FLAG_PARTIAL_ONLY,
    SpecStateError,
    Status,
    pad_to,
    status_combine,
)
from .kv import KVCache, KVConfig, KVContext
from .recurrent import Recurrent, RSConfig
from .state import Reader, Writer


def iswa_size_swa(
    kv_size: int, n_swa: int, n_seq_max: int, n_ubatch: int, unified: bool, swa_full: bool
) -> int:
    """``llama_kv_cache_iswa``: the SWA cache size."""
    if swa_full:
        return kv_size
    return pad_to(min(kv_size, n_swa * (n_seq_max if unified else 1) + n_ubatch), 256)


class Context:
    """A planned batch: the ubatches and, per part, what was planned for each."""

    def __init__(
        self, ubatches: list[UBatch], kv: dict[str, KVContext], rs: Recurrent | None
    ) -> None:
        self.ubatches = ubatches
        self.kv = kv  # part name -> context, in apply order
        self.rs = rs
        self.i = 0

    @property
    def ubatch(self) -> UBatch:
        return self.ubatches[self.i]

    def apply(self) -> None:
        for c in self.kv.values():
            c.apply()
        if self.rs is not None:
            self.rs.find_slot(self.ubatches[self.i])

    def next(self) -> bool:
        for c in self.kv.values():
            c.i_cur += 1
        self.i += 1
        return self.i < len(self.ubatches)


def _split_all(alloc: Alloc, split) -> list[UBatch] | None:
    alloc.split_reset()
    ubs = []
    while True:
        ub = split()
        if ub is None:
            break
        ubs.append(ub)
    if alloc.n_used < alloc.n_tokens:
        return None
    return ubs


class SpecMemory:
    kind = ""
    kv_parts: dict[str, KVCache]
    rs: Recurrent | None = None

    def parts_state(self) -> dict:
        return {}

    # every memory: positions, update, clear
    def clear(self, data: bool = True) -> None:
        for kv in self.kv_parts.values():
            kv.clear(data)
        if self.rs is not None:
            self.rs.clear(data)

    def update(self) -> bool:
        """``memory_update``: True when an update was applied (status SUCCESS)."""
        st = Status.NO_UPDATE
        for kv in self.kv_parts.values():
            st = status_combine(st, kv.init_update_status())
        if st == Status.NO_UPDATE:
            return False
        for kv in self.kv_parts.values():
            kv.update()
        return True

    def state_write(self, seq_id: int = -1, flags: int = 0) -> bytes:
        w = Writer()
        self._write(w, seq_id, flags)
        return bytes(w.buf)

    def state_read(self, data: bytes, seq_id: int = -1, flags: int = 0, atomic: bool = True) -> int:
        """Restore; returns the bytes consumed. A failure raises SpecStateError and, with
        ``atomic``, changes nothing; without, it leaves what the reference leaves."""
        if atomic:
            work = copy.deepcopy(self)
            r = Reader(data)
            work._read(r, seq_id, flags)
            self.__dict__.update(work.__dict__)
            return r.off
        r = Reader(data)
        self._read(r, seq_id, flags)
        return r.off


class KVMemory(SpecMemory):
    kind = "kv"

    def __init__(self, cfg: KVConfig) -> None:
        self.kv = KVCache(cfg)
        self.kv_parts = {"kv": self.kv}

    def init_batch(self, alloc: Alloc, n_ubatch: int, embd_all: bool) -> Context | None:
        kv = self.kv
        if kv.n_stream == 1:
            ubs = _split_all(alloc, lambda: alloc.split_simple(n_ubatch))
        else:
            ubs = _split_all(alloc, lambda: alloc.split_equal(n_ubatch, True, 0))
        if ubs is None:
            return None
        sinfos = kv.prepare(ubs)
        if sinfos is None:
            return None
        return Context(ubs, {"kv": KVContext(kv, sinfos, ubs)}, None)

    def seq_rm(self, s: int, p0: int, p1: int) -> bool:
        return self.kv.seq_rm(s, p0, p1)

    def seq_cp(self, a: int, b: int, p0: int, p1: int) -> None:
        self.kv.seq_cp(a, b, p0, p1)

    def seq_keep(self, s: int) -> None:
        self.kv.seq_keep(s)

    def seq_add(self, s: int, p0: int, p1: int, d: int) -> None:
        self.kv.seq_add(s, p0, p1, d)

    def seq_div(self, s: int, p0: int, p1: int, d: int) -> None:
        self.kv.seq_div(s, p0, p1, d)

    def seq_pos_min(self, s: int) -> int:
        return self.kv.seq_pos_min(s)

    def seq_pos_max(self, s: int) -> int:
        return self.kv.seq_pos_max(s)

    def get_can_shift(self) -> bool:
        return self.kv.get_can_shift()

    def _write(self, w: Writer, seq_id: int, flags: int) -> None:
        self.kv.state_write(w, seq_id)

    def _read(self, r: Reader, seq_id: int, flags: int) -> None:
        self.kv.state_read(r, seq_id, atomic=False)


class ISWAMemory(SpecMemory):
    kind = "iswa"

    def __init__(self, base: KVConfig, swa: KVConfig) -> None:
        self.base = KVCache(base)
        self.swa = KVCache(swa)
        self.unified = base.unified
        self.kv_parts = {"base": self.base, "swa": self.swa}

    def _plan(self, alloc: Alloc, n_ubatch: int) -> Context | None:
        attempts = []
        if self.unified:
            attempts.append(lambda: alloc.split_simple(n_ubatch))
        attempts.append(lambda: alloc.split_equal(n_ubatch, not self.unified, 0))
        for split in attempts:
            ubs = _split_all(alloc, split)
            if ubs is None:
                continue
            sb = self.base.prepare(ubs)
            if sb is None:
                continue
            ss = self.swa.prepare(ubs)
            if ss is None:
                continue
            return Context(
                ubs,
                {"base": KVContext(self.base, sb, ubs), "swa": KVContext(self.swa, ss, ubs)},
                None,
            )
        return None

    def init_batch(self, alloc: Alloc, n_ubatch: int, embd_all: bool) -> Context | None:
        return self._plan(alloc, n_ubatch)

    def seq_rm(self, s: int, p0: int, p1: int) -> bool:
        a = self.base.seq_rm(s, p0, p1)
        b = self.swa.seq_rm(s, p0, p1)
        return a and b

    def seq_cp(self, a: int, b: int, p0: int, p1: int) -> None:
        self.base.seq_cp(a, b, p0, p1)
        self.swa.seq_cp(a, b, p0, p1)

    def seq_keep(self, s: int) -> None:
        self.base.seq_keep(s)
        self.swa.seq_keep(s)

    def seq_add(self, s: int, p0: int, p1: int, d: int) -> None:
        self.base.seq_add(s, p0, p1, d)
        self.swa.seq_add(s, p0, p1, d)

    def seq_div(self, s: int, p0: int, p1: int, d: int) -> None:
        self.base.seq_div(s, p0, p1, d)
        self.swa.seq_div(s, p0, p1, d)

    def seq_pos_min(self, s: int) -> int:
        return self.swa.seq_pos_min(s)

    def seq_pos_max(self, s: int) -> int:
        return self.swa.seq_pos_max(s)

    def get_can_shift(self) -> bool:
        return (
            self.base.get_can_shift()
            and self.swa.get_can_shift()
            and self.base.size() == self.swa.size()
        )

    def _write(self, w: Writer, seq_id: int, flags: int) -> None:
        if not flags & FLAG_PARTIAL_ONLY:
            self.base.state_write(w, seq_id)
        self.swa.state_write(w, seq_id)

    def _read(self, r: Reader, seq_id: int, flags: int) -> None:
        if not flags & FLAG_PARTIAL_ONLY:
            self.base.state_read(r, seq_id, atomic=False)
        self.swa.state_read(r, seq_id, atomic=False)


class RecurrentMemory(SpecMemory):
    kind = "recurrent"

    def __init__(self, cfg: RSConfig) -> None:
        self.rs = Recurrent(cfg)
        self.kv_parts = {}

    def _splitter(self, alloc: Alloc, n_ubatch: int, embd_all: bool, sequential: bool):
        n_keep_tail = self.rs.n_rs_seq + 1 if self.rs.n_rs_seq > 0 else 0
        if embd_all:
            return lambda: alloc.split_seq(n_ubatch)
        return lambda: alloc.split_equal(n_ubatch, sequential, n_keep_tail)

    def init_batch(self, alloc: Alloc, n_ubatch: int, embd_all: bool) -> Context | None:
        ubs = _split_all(alloc, self._splitter(alloc, n_ubatch, embd_all, True))
        if ubs is None or not self.rs.prepare(ubs):
            return None
        return Context(ubs, {}, self.rs)

    def seq_rm(self, s: int, p0: int, p1: int) -> bool:
        return self.rs.seq_rm(s, p0, p1)

    def seq_cp(self, a: int, b: int, p0: int, p1: int) -> None:
        self.rs.seq_cp(a, b, p0, p1)

    def seq_keep(self, s: int) -> None:
        self.rs.seq_keep(s)

    def seq_add(self, s: int, p0: int, p1: int, d: int) -> None:
        self.rs.seq_add(s, p0, p1, d)

    def seq_div(self, s: int, p0: int, p1: int, d: int) -> None:
        self.rs.seq_div(s, p0, p1, d)

    def seq_pos_min(self, s: int) -> int:
        return self.rs.seq_pos_min(s)

    def seq_pos_max(self, s: int) -> int:
        return self.rs.seq_pos_max(s)

    def get_can_shift(self) -> bool:
        return True

    def _write(self, w: Writer, seq_id: int, flags: int) -> None:
        self.rs.state_write(w, seq_id)

    def _read(self, r: Reader, seq_id: int, flags: int) -> None:
        self.rs.state_read(r, seq_id, atomic=False)


class HybridMemory(RecurrentMemory):
    """Attention (plain KV or iSWA, ``attn``) + recurrent (``rs``)."""

    kind = "hybrid"

    def __init__(self, attn: KVMemory | ISWAMemory, rs: RSConfig) -> None:
        self.attn = attn
        self.rs = Recurrent(rs)
        self.kv_parts = dict(attn.kv_parts)
        self.kind = "hybrid" if isinstance(attn, KVMemory) else "hybrid_iswa"

    def _attn_kvs(self) -> list[KVCache]:
        return list(self.attn.kv_parts.values())

    def init_batch(self, alloc: Alloc, n_ubatch: int, embd_all: bool) -> Context | None:
        unified = self._attn_kvs()[0].n_stream == 1
        ubs = _split_all(alloc, self._splitter(alloc, n_ubatch, embd_all, not unified))
        if ubs is None or not self.rs.prepare(ubs):
            return None
        ctxs = {}
        for name, kv in self.attn.kv_parts.items():
            sinfos = kv.prepare(ubs)
            if sinfos is None:
                return None
            ctxs[name] = KVContext(kv, sinfos, ubs)
        return Context(ubs, ctxs, self.rs)

    def clear(self, data: bool = True) -> None:
        self.attn.clear(data)
        self.rs.clear(data)

    def seq_rm(self, s: int, p0: int, p1: int) -> bool:
        if not self.rs.seq_rm(s, p0, p1):
            return False
        return self.attn.seq_rm(s, p0, p1)

    def seq_cp(self, a: int, b: int, p0: int, p1: int) -> None:
        self.attn.seq_cp(a, b, p0, p1)
        self.rs.seq_cp(a, b, p0, p1)

    def seq_keep(self, s: int) -> None:
        self.attn.seq_keep(s)
        self.rs.seq_keep(s)

    def seq_add(self, s: int, p0: int, p1: int, d: int) -> None:
        self.attn.seq_add(s, p0, p1, d)
        self.rs.seq_add(s, p0, p1, d)

    def seq_div(self, s: int, p0: int, p1: int, d: int) -> None:
        self.attn.seq_div(s, p0, p1, d)
        self.rs.seq_div(s, p0, p1, d)

    def seq_pos_min(self, s: int) -> int:
        return max(self.attn.seq_pos_min(s), self.rs.seq_pos_min(s))

    def seq_pos_max(self, s: int) -> int:
        return min(self.attn.seq_pos_max(s), self.rs.seq_pos_max(s))

    def get_can_shift(self) -> bool:
        return self.attn.get_can_shift()

    def _write(self, w: Writer, seq_id: int, flags: int) -> None:
        if isinstance(self.attn, ISWAMemory) or not flags & FLAG_PARTIAL_ONLY:
            self.attn._write(w, seq_id, flags)
        self.rs.state_write(w, seq_id)

    def _read(self, r: Reader, seq_id: int, flags: int) -> None:
        if isinstance(self.attn, ISWAMemory):
            self.attn._read(r, seq_id, flags)  # no undo in hybrid-iSWA
            self.rs.state_read(r, seq_id, atomic=False)
            return
        read_attn = not flags & FLAG_PARTIAL_ONLY
        if read_attn:
            self.attn._read(r, seq_id, flags)
        try:
            self.rs.state_read(r, seq_id, atomic=False)
        except SpecStateError:
            if read_attn:
                self.attn.kv.state_clear_seq(seq_id)
            raise
