"""The interleaved sliding-window KV cache (``llama_kv_cache_iswa``).

Why two caches: a model that mixes full-attention layers with sliding-window (SWA) layers
only needs the last ``n_swa`` positions of each sequence for its SWA layers. Keeping those
layers in a second, much smaller :class:`~pymem.kv.KVCache` saves most of their memory::

    KVCacheISWA
    +-- base: KVCache(non-SWA layers, swa_type NONE, kv_size cells / stream)
    +-- swa:  KVCache(SWA layers, the model's n_swa / swa_type,
                      PAD(min(kv_size, n_swa * (unified ? n_seq_max : 1) + n_ubatch), 256)
                      cells / stream, or kv_size with swa_full)

Every ubatch is placed in both caches (each chooses its own cells); the SWA cache reuses
cells whose positions fell out of the window. Sequence operations fan out to both.

Contracts as :mod:`pymem.memory`. Reference behaviour kept on purpose:

* ``init_batch``: with a unified cache, ``split_simple`` is tried first; if that split
  or either cache's ``prepare`` fails, ``split_equal(n_ubatch, sequential=not unified)``
  is tried. Both caches must prepare.
* ``seq_pos_min`` / ``seq_pos_max`` come from the SWA cache only (the base cache is a
  superset), so ``pos_min`` rises as the window moves. :meth:`KVCacheISWA.seq_pos_ranges`
  reports both caches' ranges.
* ``get_can_shift`` needs both caches shiftable *and* equal sizes (``swa_full``).
* State: ``[base][swa]``; the base part is omitted under ``StateFlags.PARTIAL_ONLY``.

Better than the reference, without changing any byte or return value: a failed
``state_read`` changes nothing in either cache (both parts are parsed and validated
before either is committed; the reference leaves a restored base part behind when the
SWA part fails, so a sequence can have base cells and no SWA cells).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import numpy as np

from pymem.batch import BatchAllocator
from pymem.composite import CompositeMemory, PairContext
from pymem.errors import ConfigError
from pymem.kv.cache import KVCache, KVCacheContext
from pymem.memory import PARTIAL_ONLY_BIT, GraphInputs, Split
from pymem.spec import ModelSpec, SWAType

SWA_PAD = 256
"""The SWA cache is always padded to a multiple of 256 cells (llama.cpp issue 17037)."""


def swa_cache_size(
    kv_size: int, n_swa: int, unified: bool, n_seq_max: int, n_ubatch: int, swa_full: bool
) -> int:
    """Cells per stream of the SWA cache.

    E.g. kv_size 4096, n_swa 128, 4 seqs unified, n_ubatch 512 -> PAD(min(4096, 1024), 256) = 1024;
    not unified -> PAD(min(4096, 640), 256) = 768; swa_full -> 4096.
    """
    if swa_full:
        return kv_size
    n = min(kv_size, n_swa * (n_seq_max if unified else 1) + n_ubatch)
    return (n + SWA_PAD - 1) // SWA_PAD * SWA_PAD


class KVCacheISWAContext(PairContext["KVCacheContext", "KVCacheContext"]):
    """A base and an SWA cache context over the same ubatches (``llama_kv_cache_iswa_context``).

    Graph inputs come from the part contexts: :meth:`get_base` for the full-attention
    layers, :meth:`get_swa` for the SWA layers (each has its own slots, ``n_kv``, masks).
    Status, ``next`` and ``apply`` as :class:`~pymem.composite.PairContext`.
    """

    @property
    def ctx_base(self) -> KVCacheContext | None:
        return self.first

    @property
    def ctx_swa(self) -> KVCacheContext | None:
        return self.second

    def get_base(self) -> KVCacheContext:
        return self._pair("get_base")[0]

    def get_swa(self) -> KVCacheContext:
        return self._pair("get_swa")[1]

    def graph_inputs(self) -> GraphInputs:
        """``{"base": ..., "swa": ...}``: each cache's inputs under its part name."""
        base, swa = self._pair("graph_inputs")
        return GraphInputs({"base": base.kv_inputs(), "swa": swa.kv_inputs()})


class KVCacheISWA(CompositeMemory):
    """Base (full attention) + SWA KV caches over one model (``llama_kv_cache_iswa``).

    Arguments follow the reference constructor; ``filter`` selects model layers first
    (default: every layer with attention widths), then each layer goes to the SWA cache
    if ``spec.layers[il].swa`` else to the base cache. ``n_ubatch`` sizes the SWA cache.
    Use :meth:`from_parts` to wrap two already-built caches (the factory does).
    """

    context_type = KVCacheISWAContext

    def __init__(
        self,
        spec: ModelSpec,
        *,
        type_k: Any = "f16",
        type_v: Any = "f16",
        v_trans: bool = True,
        device: str | Mapping[int, str] = "CPU",
        swa_full: bool = False,
        unified: bool = True,
        kv_size: int,
        n_seq_max: int,
        n_ubatch: int,
        n_pad: int = 1,
        filter: Callable[[int], bool] | None = None,
        reuse: Callable[[int], int] | None = None,
    ) -> None:
        if spec.swa_type == SWAType.NONE or spec.n_swa <= 0:
            raise ConfigError(
                f"spec: an iSWA cache needs a sliding window, got swa_type {spec.swa_type.name}, "
                f"n_swa {spec.n_swa}"
            )
        for name, value in (("kv_size", kv_size), ("n_seq_max", n_seq_max), ("n_ubatch", n_ubatch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: must be an int >= 1, got {value!r}")

        def selected(il: int) -> bool:
            if filter is not None:
                return bool(filter(il))
            return spec.layers[il].n_embd_k_gqa > 0

        size_swa = swa_cache_size(kv_size, spec.n_swa, unified, n_seq_max, n_ubatch, swa_full)
        common = dict(
            type_k=type_k, type_v=type_v, v_trans=v_trans, device=device, unified=unified,
            n_seq_max=n_seq_max, n_pad=n_pad, reuse=reuse,
        )  # fmt: skip
        base = KVCache(
            spec,
            kv_size=kv_size,
            n_swa=0,
            swa_type=SWAType.NONE,
            filter=lambda il: selected(il) and not spec.layers[il].swa,
            **common,
        )
        try:
            swa = KVCache(
                spec,
                kv_size=size_swa,
                n_swa=spec.n_swa,
                swa_type=spec.swa_type,
                filter=lambda il: selected(il) and spec.layers[il].swa,
                **common,
            )
        except Exception:
            base.close()
            raise
        self._init_parts(base, swa)

    @classmethod
    def from_parts(cls, base: KVCache, swa: KVCache) -> KVCacheISWA:
        """Wrap a base cache (no SWA) and an SWA cache built for the same model."""
        if base.swa_type != SWAType.NONE:
            raise ConfigError(
                f"base: the base cache must not slide, got swa_type {base.swa_type.name}"
            )
        if base.n_stream != swa.n_stream or base.n_seq_max != swa.n_seq_max:
            raise ConfigError(
                f"swa: streams / n_seq_max {swa.n_stream} / {swa.n_seq_max} differ from the base "
                f"cache's {base.n_stream} / {base.n_seq_max}"
            )
        self = cls.__new__(cls)
        self._init_parts(base, swa)
        return self

    def _init_parts(self, base: KVCache, swa: KVCache) -> None:
        self.kv_base = base
        self.kv_swa = swa
        # the position queries answer from the SWA cache (see seq_pos_min): its bounds
        self.bounds = swa.bounds
        self.spec = base.spec
        # the constructor flag, not n_stream == 1: a one-sequence cache built with
        # unified=False still splits with split_equal(sequential=True), as the reference
        self.unified = base.unified
        self.n_seq_max = base.n_seq_max

    # --- parts and properties --------------------------------------------------------
    def get_base(self) -> KVCache:
        return self.kv_base

    def get_swa(self) -> KVCache:
        return self.kv_swa

    def get_n_stream(self) -> int:
        """Streams of the base cache (the hybrids decide sequential splits from it)."""
        return self.kv_base.get_n_stream()

    @property
    def n_stream(self) -> int:
        return self.kv_base.get_n_stream()

    @property
    def n_pos_per_embd(self) -> int:
        return self.kv_base.n_pos_per_embd

    def get_can_shift(self) -> bool:
        return (
            self.kv_base.get_can_shift()
            and self.kv_swa.get_can_shift()
            and self.kv_base.get_size() == self.kv_swa.get_size()
        )

    def parts(self) -> dict[str, KVCache]:
        """The caches by name, in serialisation order."""
        return {"base": self.kv_base, "swa": self.kv_swa}

    def _members(self) -> tuple[KVCache, KVCache]:
        return (self.kv_base, self.kv_swa)

    # --- planning (prepare / context_for / init_* come from CompositeMemory) ----------
    def splits(self, balloc: BatchAllocator, n_ubatch: int, embd_all: bool) -> list[Split]:
        """Unified: ``split_simple`` first, then ``split_equal(sequential=False)``; streams:
        ``split_equal(sequential=True)``. ``embd_all`` is ignored, as in the reference."""
        attempts: list[Split] = []
        if self.unified:
            attempts.append(partial(balloc.split_simple, n_ubatch))
        attempts.append(partial(balloc.split_equal, n_ubatch, not self.unified, 0))
        return attempts

    # --- sequence operations ---------------------------------------------------------
    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        # both caches validate the same arguments; the base checks them first
        res_base = self.kv_base.seq_rm(seq_id, p0, p1)
        res_swa = self.kv_swa.seq_rm(seq_id, p0, p1)
        return res_base and res_swa

    def seq_pos_min(self, seq_id: int) -> int:
        """From the SWA cache only (the reference assumes it is a subset of the base)."""
        return self.kv_swa.seq_pos_min(seq_id)

    def seq_pos_max(self, seq_id: int) -> int:
        return self.kv_swa.seq_pos_max(seq_id)

    def seq_pos_min_of(self, seq_ids: np.ndarray) -> np.ndarray:
        return self.kv_swa.seq_pos_min_of(seq_ids)

    def seq_pos_max_of(self, seq_ids: np.ndarray) -> np.ndarray:
        return self.kv_swa.seq_pos_max_of(seq_ids)

    def seq_pos_ranges(self, seq_id: int) -> dict[str, tuple[int, int]]:
        """Each cache's own ``(pos_min, pos_max)`` of ``seq_id`` (``(-1, -1)`` when absent).

        ``"attention"`` is the full-attention (base) cache: everything the sequence still
        has; ``"swa"`` is the window the SWA layers still see. E.g. n_swa 4 after
        positions 0..9: ``{"attention": (0, 9), "swa": (6, 9)}`` while ``seq_pos_min``
        alone says 6.
        """
        return {
            "attention": (self.kv_base.seq_pos_min(seq_id), self.kv_base.seq_pos_max(seq_id)),
            "swa": (self.kv_swa.seq_pos_min(seq_id), self.kv_swa.seq_pos_max(seq_id)),
        }

    # --- state -----------------------------------------------------------------------
    def _state_members(self, flags: int) -> tuple[KVCache, ...]:
        """``[base][swa]``; the base part is left out under ``PARTIAL_ONLY``."""
        if int(flags) & PARTIAL_ONLY_BIT:
            return (self.kv_swa,)
        return (self.kv_base, self.kv_swa)
