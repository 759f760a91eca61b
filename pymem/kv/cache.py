"""The attention KV cache (``llama_kv_cache``) and its context (``llama_kv_cache_context``).

Layout: per cached layer one K tensor ``[n_embd_k_gqa, kv_size, n_stream]`` and one V tensor
of the same shape (``n_embd_v_gqa_max`` wide when ``v_trans``). With ``v_trans`` each stream's
V block is stored transposed, element ``(channel j, cell i)`` at ``j * kv_size + i``::

    K, stream s:  row i = cell i                 V (v_trans), stream s:  row j = channel j
    +-----------------------+                    +--------------------------------+
    | k[0] k[1] ... k[E-1]  |  cell 0            | c0 c1 c2 ...        c(kv_size-1)|  channel 0
    | k[0] k[1] ... k[E-1]  |  cell 1            | c0 c1 c2 ...                    |  channel 1
    | ...                   |                    | ...                            |
    +-----------------------+                    +--------------------------------+

Streams: one (``unified``) or one per sequence (``seq_to_stream[s] = s``). The cell metadata
of all streams is stacked in one :class:`~pymem.kv.cells.StackedCells` (``cells``; row ``s``
is stream ``s``), ``v_cells[s]`` is a :class:`~pymem.kv.cells.KVCells` view of row ``s`` and
``v_heads[s]`` is where the next slot search of stream ``s`` starts. The per-ubatch work
(slot search, apply, ``n_kv``) runs on the stack for all of a ubatch's streams at once;
sequence operations, which touch one stream, use the views.

Contract (see :mod:`pymem.memory`): ``init_batch`` plans every ubatch without changing
anything; :meth:`KVCacheContext.apply` is the only call that mutates; sequence operations
take half-open ranges ``[p0, p1)`` where ``p0 < 0`` means 0 and ``p1 < 0`` means +infinity,
and ``seq_rm`` accepts ``seq_id == -1`` for "every sequence".

Differences from the reference, on purpose (each pinned by a test):

* ``prepare`` is exactly transactional. The reference restores only the planned cells, so a
  purge of SWA-masked cells done while planning survives even if the batch then fails.
* ``seq_div`` records the true displacement ``new - old`` as the pending shift; the
  reference records ``old - new`` and its K-shift rotates the wrong way.
* A failed ``state_read`` changes nothing; the reference has already removed the
  destination sequence (and zeroed the rows it took) when it reports the failure.
* Caller mistakes raise typed errors where the reference asserts or aborts: partial
  cross-stream ``seq_cp``, ``seq_add``/``seq_div`` without K-shift support, bad ids.
* Pending stream copies are taken by the update context's ``apply()``, not by
  ``init_update()`` (planning does not mutate).
* ``reuse(il) >= 0`` means layer ``il`` has no tensors of its own (the reference also
  allocates such a layer unless it has no KV, as with Gemma-3n, its only user).

Reference behaviours kept (pinned by tests): ``seq_keep`` and ``seq_add``/``seq_div`` act
on the sequence's stream only; positions belong to cells (a shared cell moves for every
sequence); a per-sequence blob with no cells does not remove the destination's cells;
sequence ids ``>= n_seq_max`` (allowed by a unified cache) are left out of blobs; a whole
restore compacts each stream to cells ``[0, n)`` and zeroes the rest.

Verified against recorded llama.cpp runs (tests/test_kv_parity.py): every cell, result,
position and state byte of ``llama.main.fa0.u1``, and of the KV part of
``jamba.main.fa1.u0``; K-shift bytes equal llama.cpp's.

This module owns the cells, heads, slot search, sequence operations and the planning
journal. The work on tensors and graph inputs lives in helper modules that take only a
:class:`~pymem.kv.layout.KVLayout`, the cells and the layers, never the cache:
:mod:`~pymem.kv.inputs` (row indices, KQ mask), :mod:`~pymem.kv.graph` (ggml views and
``set_rows``), :mod:`~pymem.kv.shift` (the K-shift graph) and :mod:`~pymem.kv.state_io`
(state blobs, zeroing cells).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np

from pymem._native import check, ffi, lib
from pymem.backend import (
    TensorSpec,
    TensorStore,
    check_reachable,
    get_device,
    report_writes,
    unreported,
)
from pymem.batch import BatchAllocator
from pymem.errors import (
    BatchError,
    ClosedError,
    ConfigError,
    RangeError,
    StateError,
    UnsupportedError,
)
from pymem.ggml import GraphRunner
from pymem.kv import graph as kv_graph
from pymem.kv import state_io
from pymem.kv.cells import (
    EMPTY_MIN,
    EXT_DEFAULT,
    STALE_MAX,
    STALE_MIN,
    CellViews,
    KVCells,
    NewRows,
    PositionBounds,
    StackedCells,
)
from pymem.kv.inputs import build_k_idxs, build_kq_mask, build_v_idxs
from pymem.kv.layout import KVLayer, KVLayout, SlotInfo, StreamHeads
from pymem.kv.shift import apply_k_shift, has_rope
from pymem.memory import (
    POS_MAX,
    GraphInputs,
    KVInputs,
    Memory,
    MemoryContext,
    MemoryStatus,
    Split,
    clamp_range,
)
from pymem.native_read import native_parts_read, program_ready, whole_program
from pymem.spec import ModelSpec, NonCausalType, SWAType, masked_swa
from pymem.state import (
    BLOB_CHANGED,
    SeqReader,
    SeqWriter,
    StateReader,
    StateWriter,
    WholePart,
    check_state_flags,
    stamped_store,
)
from pymem.types import GGMLType, ggml_type
from pymem.ubatch import LLAMA_MAX_SEQ, UBatch

N_PAD_GRAPH = 256  # n_kv is padded to a multiple of this, for a stable graph shape
# cells the batched slot search looks at first from each head (then 4x wider each pass)
SLOT_WINDOW = 16
# tokens from which a one-stream slot search tests the head window through a slice (tests
# raise it to compare with the gather path)
SLOT_SLICE_MIN = 256
# the SWA overwrite on one stream without shared cells takes StackedCells.rm_owned (tests
# turn it off to compare with the general rm)
OVERWRITE_OWNED = True
# a replayed decode-step ubatch (the step memo): the head-window slot, its placement (an
# SWA overwrite of one stream included), the streams' KQ mask and the bounds of frozen ids
# run as one native call each (csrc/pymem_step.c), each declining to numpy where its
# preconditions fail; tests turn it off to compare with the numpy path, which stays the
# reference (False with an older extension that lacks the kernels)
USE_NATIVE = all(
    hasattr(lib, name)
    for name in ("pm_step_kv_find", "pm_step_kv_place", "pm_step_kv_overwrite",
                 "pm_step_kq_mask", "pm_step_kv_pos_max")
)  # fmt: skip
# seq_rm of one sequence as one native pass over its stream (pm_step_kv_rm_seq); tests turn
# it off to compare with seq_cells_in_all + seq_rm_bit, the reference
USE_NATIVE_RM = hasattr(lib, "pm_step_kv_rm_seq")


def _int_arg(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{name} = {value}: must be {bound}")
    return value


def _pos_in(pos: np.ndarray, p0: int, p1: int) -> np.ndarray:
    """Bool mask of the non-empty cells with ``p0 <= pos < p1`` (``p0 >= 0``).

    One unsigned comparison: ``pos - p0`` wraps to a huge value below ``p0`` (and for
    empty cells, pos -1). E.g. pos [-1, 2, 5, 9], [2, 6) -> [F, T, T, F].
    """
    if p1 <= p0:
        return np.zeros(pos.shape, dtype=bool)
    rel = np.subtract(pos, np.int32(p0), dtype=np.int32).view(np.uint32)
    return rel < np.uint32(p1 - p0)


@dataclass(eq=False)
class _StepMemo:
    """What a ubatch replayed by the allocator gives this cache the same way every step.

    A decode step's ubatch comes from :meth:`pymem.batch.BatchAllocator.split_all`'s replay:
    its sequence arrays are the same read-only objects step after step, and from them
    alone (``seq_to_stream`` is fixed) follow the stream of each token block, their row
    offsets and the per-token rows of :meth:`StackedCells.set_new`. The memo is keyed on
    the identity of those frozen arrays; the slot it returns carries ``strm32`` itself, so
    ``apply_ubatch``, ``get_n_kv`` and the graph inputs recognise it by identity too.
    """

    seq_id: np.ndarray
    seq_id_unq: np.ndarray
    n_seq_id: np.ndarray
    n_tokens: int
    strm: np.ndarray | None  # int64 stream per block; None: _slot_streams refuses them
    strm32: np.ndarray  # the same, int32, read-only: the slot's strm
    offs: np.ndarray  # int64 [n_blocks, 1]: strm * kv_size, the first row of each stream
    new_rows: NewRows  # what set_new derives from the streams and ids
    s0: int  # the slot's first stream (SlotInfo.s0 of every slot made from this memo)
    # int64 [n_blocks, 1, n_embd_v_gqa_max]: each block's transposed-V element offsets
    # without the cell (build_v_idxs's offs + chan), made on first use
    v_base: np.ndarray | None = None
    # (strm, seq_id) as cffi buffers for the native kernels, made on first use
    c_args: tuple[Any, Any] | None = None


class KVCache(Memory):
    """The attention KV cache of the layers ``filter`` selects (``llama_kv_cache``).

    Arguments follow the reference constructor: ``type_k``/``type_v`` (ggml type names),
    ``v_trans`` (V stored transposed, i.e. no flash attention), ``device`` (one device name
    for every layer, or a mapping ``{il: device}``), ``unified`` (one stream, else one per
    sequence), ``kv_size`` cells per stream, ``n_seq_max``, ``n_pad`` (``kv_size`` must be a
    multiple), ``n_swa``/``swa_type`` (the window of *this* cache), ``filter(il) -> bool``
    (which model layers are cached; default: every layer with attention widths) and
    ``reuse(il) -> il_src | -1`` (layer ``il`` reads layer ``il_src``'s tensors and has none
    of its own).
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        type_k: str | GGMLType = "f16",
        type_v: str | GGMLType = "f16",
        v_trans: bool = True,
        device: str | Mapping[int, str] = "CPU",
        unified: bool = True,
        kv_size: int,
        n_seq_max: int,
        n_pad: int = 1,
        n_swa: int = 0,
        swa_type: SWAType = SWAType.NONE,
        filter: Callable[[int], bool] | None = None,
        reuse: Callable[[int], int] | None = None,
        name_tag: str = "",
    ) -> None:
        if not isinstance(spec, ModelSpec):
            raise ConfigError(f"spec: expected a pymem.spec.ModelSpec, got {type(spec).__name__}")
        self.spec = spec
        self.n_seq_max = _int_arg("n_seq_max", n_seq_max, 1, LLAMA_MAX_SEQ)
        self.n_pad = _int_arg("n_pad", n_pad, 1)
        self.kv_size = _int_arg("kv_size", kv_size, 1)
        if self.kv_size % self.n_pad:
            raise ConfigError(
                f"kv_size = {self.kv_size}: must be a multiple of n_pad = {self.n_pad}"
            )
        self.n_swa = _int_arg("n_swa", n_swa, 0)
        try:
            self.swa_type = SWAType(swa_type)
        except ValueError:
            raise ConfigError(f"swa_type: unknown value {swa_type!r}") from None
        if self.swa_type != SWAType.NONE and self.n_swa <= 0:
            raise ConfigError(
                f"n_swa = {self.n_swa}: must be > 0 when swa_type is {self.swa_type.name}"
            )
        if not isinstance(unified, bool):
            raise ConfigError(f"unified: expected a bool, got {unified!r}")
        if not isinstance(v_trans, bool):
            raise ConfigError(f"v_trans: expected a bool, got {v_trans!r}")
        self.unified = unified
        self.v_trans = v_trans
        self.n_stream = 1 if unified else self.n_seq_max
        self.type_k = ggml_type(type_k)
        self.type_v = ggml_type(type_v)
        if v_trans and self.type_v.block_size != 1:
            raise ConfigError(
                f"type_v = {self.type_v.name}: a transposed V cache (v_trans=True) stores single "
                f"elements and needs a non-block type (block size {self.type_v.block_size})"
            )
        if filter is not None and not callable(filter):
            raise ConfigError(f"filter: expected a callable il -> bool, got {filter!r}")
        if reuse is not None and not callable(reuse):
            raise ConfigError(f"reuse: expected a callable il -> il_src, got {reuse!r}")
        self.name_tag = name_tag
        self.with_ext = spec.n_pos_per_embd > 1 or spec.ple_n_heads > 0
        self.n_pos_per_embd = spec.n_pos_per_embd

        n_layer = spec.n_layer
        # [TAG_V_CACHE_VARIABLE] a transposed V is padded to the widest V of the whole model
        self.n_embd_v_gqa_max = max(lay.n_embd_v_gqa for lay in spec.layers)

        # which layers get tensors, which map onto another layer's tensors
        own: list[int] = []
        reused: dict[int, int] = {}
        for il in range(n_layer):
            if filter is not None and not filter(il):
                continue
            src = -1 if reuse is None else int(reuse(il))
            if src >= 0:
                reused[il] = src
                continue
            if filter is None and spec.layers[il].n_embd_k_gqa == 0:
                continue  # default filter: layers without attention widths (recurrent)
            own.append(il)
        for il in own:
            lay = spec.layers[il]
            if lay.n_embd_k_gqa <= 0:
                raise ConfigError(f"layers[{il}]: selected for the KV cache but n_embd_k_gqa = 0")
            # per head, not only per row: graphs view K one head at a time
            # (the reference refuses this in llama_init_from_model)
            if (
                lay.n_embd_k_gqa % self.type_k.block_size
                or lay.n_embd_head_k % self.type_k.block_size
            ):
                raise ConfigError(
                    f"layers[{il}]: K head size {lay.n_embd_head_k} (row {lay.n_embd_k_gqa}) is not a "
                    f"multiple of the {self.type_k.name} block size {self.type_k.block_size}"
                )
            if not v_trans and lay.n_embd_head_v % self.type_v.block_size:
                raise ConfigError(
                    f"layers[{il}]: V head size {lay.n_embd_head_v} is not a multiple of the "
                    f"{self.type_v.name} block size {self.type_v.block_size}"
                )
            width_v = self.n_embd_v_gqa_max if v_trans else lay.n_embd_v_gqa
            if width_v % self.type_v.block_size:
                raise ConfigError(
                    f"layers[{il}].n_embd_v_gqa = {width_v}: not a multiple of the "
                    f"{self.type_v.name} block size {self.type_v.block_size}"
                )
        for il, src in reused.items():
            if src not in own:
                raise ConfigError(f"reuse({il}) = {src}: layer {src} has no tensors in this cache")

        # devices: one store per device, created in device-name order like the reference
        if isinstance(device, Mapping):
            dev_of = {}
            for il in own:
                if il not in device:
                    raise ConfigError(f"device: no entry for layer {il} in the per-layer mapping")
                dev_of[il] = get_device(device[il]).name
        else:
            name = get_device(device).name
            dev_of = dict.fromkeys(own, name)

        specs_by_dev: dict[str, list[TensorSpec]] = {}
        for il in own:
            lay = spec.layers[il]
            width_v = self.n_embd_v_gqa_max if v_trans else lay.n_embd_v_gqa
            lst = specs_by_dev.setdefault(dev_of[il], [])
            lst.append(
                TensorSpec(
                    f"cache_{name_tag}k_l{il}",
                    self.type_k,
                    (lay.n_embd_k_gqa, self.kv_size, self.n_stream),
                )
            )
            # [TAG_MLA_K_ONLY] an MLA model's caches have no V tensors
            if width_v > 0 and not spec.is_mla:
                lst.append(
                    TensorSpec(
                        f"cache_{name_tag}v_l{il}",
                        self.type_v,
                        (width_v, self.kv_size, self.n_stream),
                    )
                )
        self.stores: dict[str, TensorStore] = {}
        try:
            for dev in sorted(specs_by_dev):
                self.stores[dev] = TensorStore(dev, specs_by_dev[dev])
        except Exception:
            for st in self.stores.values():
                st.close()
            raise

        self.layers: list[KVLayer] = []
        self.map_layer_ids: dict[int, int] = {}
        for il in own:
            lay = spec.layers[il]
            store = self.stores[dev_of[il]]
            vname = f"cache_{name_tag}v_l{il}"
            self.map_layer_ids[il] = len(self.layers)
            self.layers.append(
                KVLayer(
                    il=il,
                    k=store[f"cache_{name_tag}k_l{il}"],
                    v=store[vname] if vname in store else None,  # noqa: SIM401
                    n_embd_k_gqa=lay.n_embd_k_gqa,
                    n_embd_v_gqa=lay.n_embd_v_gqa,
                    device=dev_of[il],
                )
            )
        for il, src in reused.items():
            self.map_layer_ids[il] = self.map_layer_ids[src]

        self.cells = StackedCells(self.n_stream, self.kv_size, self.with_ext, self.n_seq_max)
        # the rows past the cells stay zero (StackedCells.rows_hi) until a write through a
        # K/V tensor's own API, which may put bytes anywhere: then any row may hold bytes
        report_writes(
            self,
            [t for lay in self.layers for t in (lay.k, lay.v) if t is not None],
            lambda cache: cache.cells.rows_hi.fill(cache.kv_size),
        )
        self.v_cells = CellViews(KVCells.view(self.cells, s) for s in range(self.n_stream))
        self.v_heads = StreamHeads(self.n_stream)
        if self.n_stream > 1:
            self.seq_to_stream = np.arange(self.n_stream, dtype=np.int32)
        else:
            self.seq_to_stream = np.zeros(LLAMA_MAX_SEQ, dtype=np.int32)
        self.seq_to_stream.flags.writeable = False
        # per sequence id, its (stream, sequence) key into the cells' bounds, for the
        # scalar queries: E.g. streams -> [0, 257, 514, ...]; unified -> [0, 1, 2, ...]
        keys = self.seq_to_stream.astype(np.int64) * LLAMA_MAX_SEQ + np.arange(
            len(self.seq_to_stream)
        )
        self._seq_key: list[int] = keys.tolist()
        self._stream_of: list[int] = self.seq_to_stream.tolist()  # (plain ints)
        self._rm_out = ffi.new("int64_t[2]")  # seq_rm's native outputs (freed, first)
        # the cached position bounds, read by the queries here and by a composite's; its
        # n_open is the ids the checks' fast path takes without naming anything: all of
        # them while open, none once closed (so that path needs no closed test of its own)
        self.bounds = PositionBounds(self._seq_key, self.cells)
        # the same facts, frozen, for the helper modules
        self.layout = KVLayout(
            kv_size=self.kv_size,
            n_stream=self.n_stream,
            n_seq_max=self.n_seq_max,
            n_pad=self.n_pad,
            v_trans=self.v_trans,
            swa_type=self.swa_type,
            n_swa=self.n_swa,
            type_k=self.type_k,
            type_v=self.type_v,
            n_embd_v_gqa_max=self.n_embd_v_gqa_max,
            with_ext=self.with_ext,
            n_pos_per_embd=self.n_pos_per_embd,
            seq_to_stream=self.seq_to_stream,
        )
        self._pending_copies: list[tuple[int, int]] = []
        self._can_shift = spec.kv_shiftable and spec.n_pos_per_embd == 1  # fixed by the spec
        self._version = 0  # bumped by every mutation (stale state-read plans are refused)
        self._memo: _StepMemo | None = None  # the last replayed ubatch layout seen
        self._layer_set = frozenset(layer.il for layer in self.layers)  # KVInputs.layers
        self._keys_memo: tuple[np.ndarray, np.ndarray] | None = None  # (frozen ids, keys)
        self._keys_c: tuple[np.ndarray, Any] | None = None  # (those keys, their cffi buffer)
        self._runners: dict[str, GraphRunner] = {}
        self._section: state_io.NativeSection | bool | None = False  # False: not built yet
        self._blob: state_io.SeqBlob | Literal[False] | None = False  # False: not built yet
        self._hooks: state_io.KVStateHooks | None = None  # a restore's cache operations
        # a whole read into empty cells: a one-part pm_whole_read (array, part), or None
        self._whole_one: tuple[Any, list[WholePart]] | None = None
        self._no_cells = bytes(8 * self.n_stream)  # the int64 counters of a stack without cells
        self._step_cells: Any = None  # pm_step_cells * over self.cells, built on first use
        self._no_update: KVCacheContext | None = None  # init_update's answer with nothing to do
        # (slot, version, top) of the last native placement: get_n_kv's bound, while valid
        self._placed_top: tuple[SlotInfo, int, int] | None = None
        self._closed = False

    # --- properties -----------------------------------------------------------------
    def get_size(self) -> int:
        return self.kv_size

    def get_n_seq_max(self) -> int:
        return self.n_seq_max

    def get_n_stream(self) -> int:
        return self.n_stream

    def get_layer_ids(self) -> list[int]:
        return [layer.il for layer in self.layers]

    def get_has_shift(self) -> bool:
        return bool(self.cells.has_shift.any())

    def has_cell_ext(self) -> bool:
        """Whether cells carry ``(x, y, tok)`` that a state blob must hold (M-RoPE / PLE)."""
        return self.with_ext

    def get_can_shift(self) -> bool:
        return self._can_shift

    def layer(self, il: int) -> KVLayer:
        """The cached layer that model layer ``il`` reads (after ``reuse``)."""
        try:
            return self.layers[self.map_layer_ids[il]]
        except KeyError:
            raise RangeError(
                f"il = {il}: layer not in this cache (cached: {sorted(self.map_layer_ids)})"
            ) from None

    def get_stream(self, seq_id: int) -> int:
        self._check_seq(seq_id, "seq_id")
        return int(self.seq_to_stream[seq_id])

    def get_cells(self, seq_id: int) -> KVCells:
        return self.v_cells[self.get_stream(seq_id)]

    def parts(self) -> dict[str, KVCache]:
        return {"kv": self}

    def cell_owners(self) -> np.ndarray:
        return self.cells.owner_f.copy()

    def memory_breakdown(self) -> dict[str, int]:
        self.check_open()
        return {dev: store.nbytes for dev, store in self.stores.items()}

    def size_k_bytes(self) -> int:
        return sum(layer.k.nbytes for layer in self.layers)

    def size_v_bytes(self) -> int:
        return sum(layer.v.nbytes for layer in self.layers if layer.v is not None)

    def check_devices(self) -> None:
        check_reachable(store.device for store in self.stores.values())

    def close(self) -> None:
        for runner in self._runners.values():
            runner.close()
        self._runners.clear()
        for st in self.stores.values():
            st.close()
        self._closed = True
        self.bounds.n_open = 0

    def _runner(self, device: str) -> GraphRunner:
        """The graph runner of ``device`` (K-shift), created on first use."""
        runner = self._runners.get(device)
        if runner is None:
            runner = self._runners[device] = GraphRunner(device)
        return runner

    # --- argument checks ---------------------------------------------------------------
    def check_open(self) -> None:
        if self._closed:
            raise ClosedError("KVCache: already closed (its buffers were freed)")

    def _check_seq(self, seq_id: Any, what: str, allow_all: bool = False) -> int:
        if type(seq_id) is int and 0 <= seq_id < self.bounds.n_open:
            return seq_id  # the common call, without the checks that name what is wrong
        self.check_open()
        if isinstance(seq_id, bool) or not isinstance(seq_id, (int, np.integer)):
            raise RangeError(f"{what}: expected an integer sequence id, got {seq_id!r}")
        seq_id = int(seq_id)
        if allow_all and seq_id == -1:
            return seq_id
        if not 0 <= seq_id < len(self.seq_to_stream):
            extra = " or -1 (all sequences)" if allow_all else ""
            raise RangeError(f"{what} = {seq_id}: must be in [0, {len(self.seq_to_stream)}){extra}")
        return seq_id

    def _mutated(self) -> None:
        self._version += 1

    # --- sequence operations ---------------------------------------------------------
    def clear(self, data: bool = True) -> None:
        """Empty every stream; with ``data`` also zero the tensor buffers."""
        self.check_open()
        if data:
            self.check_devices()
        # every stream, its shifts and its head emptied by one native call where it may
        if not self._clear_native():
            self.cells.reset()
            self.v_heads[:] = 0
        if data:
            for store in self.stores.values():
                store.clear(0)
            self.cells.rows_hi[:] = 0  # (every row zero)
        self._mutated()

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove ``seq_id`` (or every sequence for -1) from the cells in ``[p0, p1)``.

        Always True, as the reference. The head of a stream moves back to the first freed
        cell when that is before it.
        """
        self.check_open()
        seq_id = self._check_seq(seq_id, "seq_id", allow_all=True)
        p0, p1 = clamp_range(p0, p1)
        self._mutated()
        if seq_id >= 0:
            strm = self._stream_of[seq_id]
            if USE_NATIVE_RM and self._seq_rm_native(strm, seq_id, p0, p1):
                return True
            cells = self.v_cells[strm]
            idx, whole = cells.seq_cells_in_all(seq_id, p0, p1)  # whole: no cells left after
            freed = cells.seq_rm_bit(idx, seq_id, whole)
            heads = self.v_heads.a  # the array itself: one scalar read, no wrapper call
            if freed.size and freed[0] < heads[strm]:
                heads[strm] = freed[0]
            return True
        gid = np.flatnonzero(_pos_in(self.cells.pos_f, p0, p1))
        self.cells.rm(gid)
        self._heads_back_to(gid)
        return True

    def _seq_rm_native(self, strm: int, seq_id: int, p0: int, p1: int) -> bool:
        """``seq_rm`` of one sequence in one native call (``pm_step_kv_seq_rm``: the
        cached bounds' verdict, the removal in one pass, the head's move back): the same
        cells and bookkeeping as ``range_cover`` + ``seq_cells_in_all`` + ``seq_rm_bit``,
        which stay the reference (cells ``seq_id`` shares with other sequences lose its bit
        and keep their position). False where the kernel does not apply (cells with ext,
        an undo journal)."""
        if self.cells.ext is not None or self.cells.journaling:
            return False
        c, heads, _, done = self._native_cells()
        out = self._rm_out
        check(lib.pm_step_kv_seq_rm(c, heads, strm, seq_id, p0, p1, out, out + 1, done), "seq_rm")
        return bool(done[0])

    def _heads_back_to(self, gid: np.ndarray) -> None:
        """Move each stream's head back to its first cell among ``gid`` (freed cells by
        global id, ascending) when that is before it.

        E.g. size 8, heads [5, 5], gid [2, 3, 9] -> first cells [2, 1] -> heads [2, 1].
        """
        if gid.size == 0:
            return
        if self.n_stream == 1:
            self.v_heads.a[0] = min(self.v_heads.a[0], gid[0])
            return
        strm = gid // self.kv_size
        # the first cell of each stream: E.g. strm [0, 0, 1] -> starts [0, 2]
        starts = np.flatnonzero(np.concatenate(([True], strm[1:] != strm[:-1])))
        first, strm = gid[starts] - strm[starts] * self.kv_size, strm[starts]
        self.v_heads.a[strm] = np.minimum(self.v_heads.a[strm], first)

    def seq_cp(self, seq_id_src: int, seq_id_dst: int, p0: int = -1, p1: int = -1) -> None:
        """Make the cells of ``seq_id_src`` in ``[p0, p1)`` also belong to ``seq_id_dst``.

        Within a stream this only adds the destination id (the cells are shared). Across
        streams it needs the whole range: the destination stream is reset, the source's
        cells are copied at the same indices, and the tensor bytes follow at the next
        ``init_update().apply()``.
        """
        self.check_seq_cp(seq_id_src, seq_id_dst, p0, p1)
        s0 = int(self.seq_to_stream[seq_id_src])
        s1 = int(self.seq_to_stream[seq_id_dst])
        if s0 == s1:
            if seq_id_src == seq_id_dst:
                return
            lo, hi = clamp_range(p0, p1)
            cells = self.v_cells[s0]
            idx = cells.seq_cells_in(seq_id_src, lo, hi)
            self._mutated()
            cells.seq_add_bit(idx, seq_id_dst)
            return
        self._mutated()
        self._pending_copies.append((s0, s1))
        src = self.v_cells[s0]
        dst = self.v_cells[s1]
        dst.reset()
        dst.copy_from(src, src.seq_cells(seq_id_src), seq_id_dst)
        self.v_heads[s1] = self.v_heads[s0]

    def seq_keep(self, seq_id: int) -> None:
        """Remove every sequence but ``seq_id`` from its stream."""
        seq_id = self._check_seq(seq_id, "seq_id")
        strm = int(self.seq_to_stream[seq_id])
        self._mutated()
        freed = self.v_cells[strm].seq_keep(seq_id)
        if freed.size and int(freed[0]) < self.v_heads[strm]:
            self.v_heads[strm] = int(freed[0])

    def _check_shiftable(self, what: str) -> None:
        if self._can_shift:
            return
        if self.spec.n_pos_per_embd > 1:
            raise UnsupportedError(
                f"{what}: needs n_pos_per_embd == 1, the model has {self.spec.n_pos_per_embd} (M-RoPE)"
            )
        raise UnsupportedError(f"{what}: this cache / model configuration does not support K-shift")

    def check_seq_cp(self, seq_id_src: int, seq_id_dst: int, p0: int = -1, p1: int = -1) -> None:
        """Raise what :meth:`seq_cp` would refuse, changing nothing (compositions check
        every part before mutating any)."""
        seq_id_src = self._check_seq(seq_id_src, "seq_id_src")
        seq_id_dst = self._check_seq(seq_id_dst, "seq_id_dst")
        if int(self.seq_to_stream[seq_id_src]) == int(self.seq_to_stream[seq_id_dst]):
            return
        # the reference's test of a "full" range, kept as is: p = size - 1 still counts as full
        size = self.kv_size
        partial = (p0 > 0 and p0 + 1 < size) or (p1 > 0 and p1 + 1 < size)
        if partial:
            raise UnsupportedError(
                f"seq_cp({seq_id_src} -> {seq_id_dst}, p0={p0}, p1={p1}): sequences in different "
                f"streams can only be copied whole (p0 < 0 and p1 < 0; cache size {size})"
            )

    def check_seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        """Raise what :meth:`seq_add` would refuse, changing nothing."""
        seq_id = self._check_seq(seq_id, "seq_id")
        self._check_shiftable("seq_add")
        shift = int(shift)
        if shift <= 0:
            return
        cells = self.v_cells[int(self.seq_to_stream[seq_id])]
        lo, hi = clamp_range(p0, p1)
        idx = cells.seq_cells_in(seq_id, lo, hi)
        if idx.size and int(cells.pos[idx].max()) + shift > POS_MAX:
            raise RangeError(f"seq_add: shift {shift} moves a position past {POS_MAX}")

    def check_seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        """Raise what :meth:`seq_div` would refuse, changing nothing."""
        self._check_seq(seq_id, "seq_id")
        self._check_shiftable("seq_div")
        if int(d) < 1:
            raise RangeError(f"seq_div: d = {int(d)} must be >= 1")

    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        """Add ``shift`` to the positions of ``seq_id`` in ``[p0, p1)`` (K rotated later).

        Cells whose position becomes negative are freed. Positions belong to cells, so a
        cell shared with another sequence moves for both.
        """
        seq_id = self._check_seq(seq_id, "seq_id")
        self._check_shiftable("seq_add")
        shift = int(shift)
        if shift == 0:
            return
        strm = int(self.seq_to_stream[seq_id])
        cells = self.v_cells[strm]
        lo, hi = clamp_range(p0, p1)
        if lo == hi:
            return
        idx = cells.seq_cells_in(seq_id, lo, hi)
        if idx.size and int(cells.pos[idx].max()) + shift > POS_MAX:
            raise RangeError(f"seq_add: shift {shift} moves a position past {POS_MAX}")
        self._mutated()
        freed = cells.pos_add(idx, shift)
        self.v_heads[strm] = int(freed[0]) if freed.size else 0

    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        """Integer-divide the positions of ``seq_id`` in ``[p0, p1)`` by ``d`` (>= 1)."""
        seq_id = self._check_seq(seq_id, "seq_id")
        self._check_shiftable("seq_div")
        d = int(d)
        if d < 1:
            raise RangeError(f"seq_div: d = {d} must be >= 1")
        if d == 1:
            return
        cells = self.v_cells[int(self.seq_to_stream[seq_id])]
        lo, hi = clamp_range(p0, p1)
        if lo == hi:
            return
        idx = cells.seq_cells_in(seq_id, lo, hi)
        self._mutated()
        cells.pos_div(idx, d)

    def seq_pos_min(self, seq_id: int) -> int:
        if type(seq_id) is not int or not 0 <= seq_id < self.bounds.n_open:
            seq_id = self._check_seq(seq_id, "seq_id")  # raises, or an np.integer id
        key = self._seq_key[seq_id]
        c = self.cells
        if c.pdirty_m[key] & STALE_MIN:  # memoryviews: plain ints, no numpy scalars
            c.refresh(np.array([key // LLAMA_MAX_SEQ]), np.array([seq_id]))
        v: int = c.pmin_m[key]
        return -1 if v == EMPTY_MIN else v

    def seq_pos_max(self, seq_id: int) -> int:
        # the common call (an open cache, a plain int in range) skips _check_seq's checks
        if type(seq_id) is not int or not 0 <= seq_id < self.bounds.n_open:
            seq_id = self._check_seq(seq_id, "seq_id")  # raises, or an np.integer id
        key = self._seq_key[seq_id]
        c = self.cells
        if c.pdirty_m[key] & STALE_MAX:
            c.refresh(np.array([key // LLAMA_MAX_SEQ]), np.array([seq_id]))
        v: int = c.pmax_m[key]
        return v

    def _seq_keys(self, seq_ids: np.ndarray) -> np.ndarray:
        """(stream, sequence) keys ``s * 256 + seq_id`` of ``seq_ids``; the first id out of
        range raises as :meth:`_check_seq` would. E.g. 2 streams, ids [1, 0] -> [257, 0]."""
        self.check_open()
        km = self._keys_memo
        if km is not None and seq_ids is km[0]:
            return km[1]  # the allocator's frozen layout array of the last step
        ids = np.asarray(seq_ids)
        if ids.dtype.kind not in "iu":
            raise RangeError(f"seq_id: expected integer sequence ids, got dtype {ids.dtype}")
        ids = ids.astype(np.int64, copy=False)
        bad = (ids < 0) | (ids >= len(self.seq_to_stream))
        if bad.any():
            self._check_seq(int(ids[np.argmax(bad)]), "seq_id")
        keys = self.seq_to_stream[ids].astype(np.int64) * LLAMA_MAX_SEQ + ids
        if isinstance(seq_ids, np.ndarray) and not seq_ids.flags.writeable:
            keys.flags.writeable = False
            self._keys_memo = (seq_ids, keys)
            self._keys_c = (keys, ffi.from_buffer("int64_t[]", keys))
        return keys

    def seq_pos_min_of(self, seq_ids: np.ndarray) -> np.ndarray:
        """``seq_pos_min`` of each of ``seq_ids`` (int64), from the cached bounds."""
        v = self.cells.pos_min_at(self._seq_keys(seq_ids))
        return np.where(v == EMPTY_MIN, -1, v)

    def frozen_keys_c(self, seq_ids: np.ndarray) -> Any | None:
        """The C buffer of ``seq_ids``' (stream, sequence) keys when ``seq_ids`` is the
        frozen id array a previous query memoised (a decode step's allocator layout) and
        the native kernels are in use; None otherwise (a composite then asks the general
        way, which memoises it for the next step)."""
        self.check_open()
        km, kc = self._keys_memo, self._keys_c
        if not USE_NATIVE or km is None or kc is None or km[0] is not seq_ids or kc[0] is not km[1]:
            return None
        return kc[1]

    def step_cells(self) -> tuple[Any, Any]:
        """The cells' ``pm_step_cells *`` and an int32 flag buffer, for a native kernel that
        reads this cache's cells beside another memory's (a hybrid's fused position
        query); the pointers stay valid while the cache is open."""
        self.check_open()
        c, _, _, flag = self._native_cells()
        return c, flag

    def seq_pos_max_of(self, seq_ids: np.ndarray) -> np.ndarray:
        """``seq_pos_max`` of each of ``seq_ids`` (int64), from the cached bounds."""
        keys = self._seq_keys(seq_ids)
        keys_c = self.frozen_keys_c(seq_ids)
        if keys_c is not None:
            # the allocator's frozen ids (a decode step): one native read of the bounds
            out = np.empty(keys.size, dtype=np.int64)
            c, _, _, ok = self._native_cells()
            status = lib.pm_step_kv_pos_max(
                c, keys_c, keys.size, ffi.from_buffer("int64_t[]", out, require_writable=True), ok
            )  # fmt: skip
            if status != lib.PM_OK:
                check(status, f"pm_step_kv_pos_max ({keys.size} keys)")
            if ok[0]:
                return out
        return self.cells.pos_max_at(keys)

    # --- planning --------------------------------------------------------------------
    def splits(self, balloc: BatchAllocator, n_ubatch: int, embd_all: bool) -> list[Split]:
        """One stream: ``split_simple``; several: ``split_equal(sequential=True)``."""
        # partials, not lambdas: the allocator recognises its own splitters and replays
        # their ubatches for a batch with the sequence layout of the previous step
        if self.n_stream == 1:
            return [partial(balloc.split_simple, n_ubatch)]
        return [partial(balloc.split_equal, n_ubatch, True, 0)]

    def context_for(self, plan: list[SlotInfo], ubatches: Sequence[UBatch]) -> KVCacheContext:
        """A batch context applying the slots :meth:`prepare` planned for ``ubatches``."""
        return KVCacheContext(self, MemoryStatus.SUCCESS, sinfos=plan, ubatches=list(ubatches))

    def failed_context(self, status: MemoryStatus) -> KVCacheContext:
        return KVCacheContext(self, status)

    def init_full(self) -> KVCacheContext:
        """A context for worst-case graph reservation: ``n_kv = kv_size``, a dummy slot."""
        self.check_open()
        sinfo = SlotInfo(
            np.arange(self.n_stream, dtype=np.int32), np.zeros((self.n_stream, 1), dtype=np.int32)
        )
        ctx = KVCacheContext(self, MemoryStatus.SUCCESS, sinfos=[sinfo], ubatches=[])
        ctx.n_kv = self.kv_size
        ctx._full = True
        return ctx

    def init_update(self, optimize: bool = False) -> KVCacheContext:
        """A context whose ``apply()`` runs pending stream copies and the K-shift.

        Status NO_UPDATE when there is neither. ``optimize`` is ignored (defrag was
        removed from the reference).
        """
        self.check_open()
        do_shift = self.get_has_shift()
        if not do_shift and not self._pending_copies:
            # one context per cache: it only reports NO_UPDATE (apply does nothing), so
            # every decode step reuses it
            if self._no_update is None:
                self._no_update = KVCacheContext(self, MemoryStatus.NO_UPDATE)
            return self._no_update
        ctx = KVCacheContext(self, MemoryStatus.SUCCESS)
        ctx._update = True
        ctx.do_shift = do_shift
        return ctx

    def begin_plan(self) -> np.ndarray:
        """Start the cells' undo journal (every stream); returns the heads to restore."""
        self.cells.begin()
        return self.v_heads.a.copy()

    def rollback_plan(self, heads: np.ndarray) -> None:
        self.cells.rollback()
        self.v_heads.a[:] = heads

    def prepare(self, ubatches: Sequence[UBatch]) -> list[SlotInfo] | None:
        """Plan every ubatch in order, each seeing the ones before it; None on failure.

        Runs ``find_slot`` and ``apply_ubatch`` under an undo journal and rolls everything
        back, so the cache is exactly as before whatever happens. The last ubatch is only
        placed: nothing after it needs to see it (a one-ubatch decode step plans without
        changing a cell).
        """
        self.check_open()
        if len(ubatches) == 1:  # only placed: find_slot changes nothing, no journal needed
            sinfo = self.find_slot(ubatches[0], False)
            return None if sinfo is None else [sinfo]
        res: list[SlotInfo] = []
        with self._planning():
            for i, ub in enumerate(ubatches):
                sinfo = self.find_slot(ub, False)
                if sinfo is None:
                    return None
                res.append(sinfo)
                if i + 1 < len(ubatches):
                    self.apply_ubatch(sinfo, ub)
        return res

    @contextmanager
    def _planning(self) -> Iterator[None]:
        """Journal every stream; on exit put back the cells, heads and version exactly."""
        version = self._version
        heads = self.begin_plan()
        try:
            yield
        finally:
            self.rollback_plan(heads)
            self._version = version

    def _usable(self, cells: KVCells, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Cells ``[lo, hi)`` a new token may take: empty, or held by exactly one sequence
        and outside that sequence's window seen from its next position (``pos_max + 1``)."""
        hi = cells.size if hi is None else hi
        usable = cells.pos[lo:hi] < 0
        if self.swa_type != SWAType.NONE:
            own = cells.owner[lo:hi]
            single = np.flatnonzero(own >= 0)
            if single.size:
                pmax = cells.seq_pos_max_all()
                p1 = pmax[own[single]] + 1
                p0 = cells.pos[lo:hi][single]
                usable[single[masked_swa(self.n_swa, self.swa_type, p0, p1)]] = True
        return usable

    def find_slot(self, ubatch: UBatch, cont: bool = False) -> SlotInfo | None:
        """Cells for the ubatch's tokens, per stream; None if they do not fit.

        The search starts at the stream's head (or at 0 when at least ``2 * n_tokens``
        unused cells lie before it) and wraps around once. With ``cont`` the cells must be
        consecutive (no wrap inside a slot); otherwise the first usable cells are taken in
        scan order, e.g. head 5, usable cells [1, 2, 6, 9], 3 tokens -> [6, 9, 1].

        Without ``cont`` every stream of the ubatch is searched at once
        (:meth:`_find_slot_batched`); :meth:`_find_slot_streams`, one stream at a time, is
        the reference, and takes ``cont`` and the ubatches it refuses.
        """
        self.check_open()
        n_tokens = ubatch.n_tokens
        n_seqs = 1
        if self.n_stream > 1:
            if ubatch.n_seqs_unq <= 0 or n_tokens % ubatch.n_seqs_unq:
                raise BatchError(
                    f"find_slot: {n_tokens} tokens do not split evenly over {ubatch.n_seqs_unq} "
                    "sequences (one stream per sequence needs split_equal ubatches)"
                )
            n_seqs = ubatch.n_seqs_unq
            n_tokens //= n_seqs
        if not cont:
            memo = self._memo_of(ubatch, n_seqs, n_tokens)
            strm = self._slot_streams(ubatch, n_seqs, n_tokens) if memo is None else memo.strm
            if strm is not None:
                if n_tokens > self.kv_size:
                    return None
                if USE_NATIVE and memo is not None:
                    sinfo = self._find_slot_native(memo, n_tokens)
                    if sinfo is not None:
                        return sinfo
                return self._find_slot_batched(strm, n_tokens, memo)
        return self._find_slot_streams(ubatch, n_seqs, n_tokens, cont)

    def _memo_of(self, ubatch: UBatch, n_seqs: int, n_tokens: int) -> _StepMemo | None:
        """The :class:`_StepMemo` of a replayed ubatch (built on first sight), None for a
        ubatch whose sequence arrays can still change."""
        m = self._memo
        sid, unq, nsid = ubatch.seq_id, ubatch.seq_id_unq, ubatch.n_seq_id
        if (
            m is not None
            and m.seq_id is sid
            and m.seq_id_unq is unq
            and m.n_seq_id is nsid
            and m.n_tokens == ubatch.n_tokens
        ):
            return m
        if sid.flags.writeable or unq.flags.writeable or nsid.flags.writeable:
            return None
        strm = self._slot_streams(ubatch, n_seqs, n_tokens)
        base = np.zeros(n_seqs, dtype=np.int64) if strm is None else strm
        strm32 = base.astype(np.int32)
        strm32.flags.writeable = False
        m = _StepMemo(
            seq_id=sid,
            seq_id_unq=unq,
            n_seq_id=nsid,
            n_tokens=ubatch.n_tokens,
            strm=strm,
            strm32=strm32,
            offs=base[:, None] * self.kv_size,
            new_rows=NewRows.of(base, n_tokens, sid),
            s0=int(strm32.min()) if strm32.size else 0,
        )
        self._memo = m
        return m

    def _memo_for(self, sinfo: SlotInfo) -> _StepMemo | None:
        """The memo whose slot ``sinfo`` is (found by :meth:`find_slot` from a replayed
        ubatch), else None."""
        m = self._memo
        return m if m is not None and sinfo.strm is m.strm32 else None

    def _native_cells(self) -> Any:
        """(the cells' ``pm_step_cells *`` (:meth:`StackedCells.native`), the heads'
        buffer, an int64 and an int32 output) for the step kernels; built once (the
        heads' array is never rebound)."""
        if self._step_cells is None:
            heads = ffi.from_buffer("int64_t[]", self.v_heads.a, require_writable=True)
            self._step_cells = (
                self.cells.native(),
                heads,
                ffi.new("int64_t *"),
                ffi.new("int32_t *"),
            )
        return self._step_cells

    def _find_slot_native(self, memo: _StepMemo, n_per: int) -> SlotInfo | None:
        """The head-window slot of a replayed ubatch (``n_per`` tokens in each of its
        streams) in one native call, None when a cell of it is taken (the numpy search
        then decides)."""
        assert memo.strm is not None
        c, heads, _, placed = self._native_cells()
        n = memo.strm.size
        idxs = np.empty((n, n_per), dtype=np.int32)
        status = lib.pm_step_kv_find(
            c, ffi.from_buffer("int64_t[]", memo.strm), n, n_per, heads, int(self.swa_type),
            self.n_swa, ffi.from_buffer("int32_t[]", idxs, require_writable=True), placed,
        )  # fmt: skip
        if status != lib.PM_OK:
            check(status, f"pm_step_kv_find ({n} streams of {self.n_stream})")
        return SlotInfo(memo.strm32, idxs) if placed[0] else None

    def _slot_streams(self, ubatch: UBatch, n_seqs: int, n_tokens: int) -> np.ndarray | None:
        """The stream of each of the ubatch's ``n_seqs`` token blocks (int64), or None when a
        block is one :meth:`_find_slot_streams` refuses (it raises the exact error)."""
        seq = ubatch.seq_id_unq[:n_seqs].astype(np.int64)
        if seq.size != n_seqs:
            return None
        ok = (seq >= 0) & (seq < len(self.seq_to_stream))
        if self.n_stream > 1:
            # block s must belong to seq_id_unq[s] alone: E.g. n_tokens 2 -> first tokens [0, 2, 4]
            t0 = np.arange(n_seqs) * n_tokens
            ok &= (ubatch.n_seq_id[t0] == 1) & (ubatch.seq_id[t0, 0] == seq)
        if not ok.all():
            return None
        return self.seq_to_stream[seq].astype(np.int64)

    def _find_slot_streams(
        self, ubatch: UBatch, n_seqs: int, n_tokens: int, cont: bool
    ) -> SlotInfo | None:
        """:meth:`find_slot` one stream at a time (the reference, and ``cont``)."""
        strm = np.empty(n_seqs, dtype=np.int32)
        idxs = np.empty((n_seqs, n_tokens), dtype=np.int32)
        for s in range(n_seqs):
            seq_id = int(ubatch.seq_id_unq[s])
            if not 0 <= seq_id < len(self.seq_to_stream):
                raise RangeError(
                    f"find_slot: seq_id {seq_id} outside [0, {len(self.seq_to_stream)})"
                )
            if self.n_stream > 1:
                t0 = s * n_tokens
                if ubatch.n_seq_id[t0] != 1 or ubatch.seq_id[t0, 0] != seq_id:
                    raise BatchError(
                        f"find_slot: token block {s} must belong to sequence {seq_id} alone "
                        "(one stream per sequence)"
                    )
            st = int(self.seq_to_stream[seq_id])
            cells = self.v_cells[st]
            head = self.v_heads[st]
            if head > cells.used + 2 * n_tokens:
                head = 0
            if n_tokens > cells.size:
                return None
            found = self._search(cells, head, n_tokens, cont)
            if found is None:
                return None
            strm[s] = st
            idxs[s] = found
        return SlotInfo(strm, idxs)

    def _find_slot_batched(
        self, strm: np.ndarray, n: int, memo: _StepMemo | None = None
    ) -> SlotInfo | None:
        """``n`` cells in each of the distinct streams ``strm``, all streams at once.

        Each stream scans its cells in circular order from its head, as :meth:`_search`
        (no ``cont``), through widening windows: the ``n`` cells from the head (a decode
        step usually takes them), then, for the streams still short of ``n`` usable cells,
        ``SLOT_WINDOW`` cells (at least ``4 n``), then 4x wider each pass, up to the whole
        stream. E.g. size 8, head 6, usable cells [1, 2, 7], n 2: window [6, 7] has one,
        window [6, 7, 0, 1, ...] -> [7, 1].
        """
        st = self.cells
        size = self.kv_size
        if strm.size == 1 and n <= size:
            # one stream (a unified cache): the head window on Python ints
            s = int(strm[0])
            h = int(self.v_heads.a[s])
            h = 0 if h > int(st.used[s]) + 2 * n else h
            if n >= SLOT_SLICE_MIN and h + n <= size:
                # many cells (a restore, a prompt), no wrap: the head window tested through
                # a slice, and on failure the scan (what the window test leads to below)
                cells = self.v_cells[s]
                strm32 = strm.astype(np.int32) if memo is None else memo.strm32
                if self._usable(cells, h, h + n).all():
                    return SlotInfo(strm32, np.arange(h, h + n, dtype=np.int32).reshape(1, n))
                found = self._search(cells, h, n, False)
                if found is None:
                    return None
                return SlotInfo(strm32, found.astype(np.int32).reshape(1, n))
            cols = np.arange(h, h + n, dtype=np.int64).reshape(1, n)
            if h + n > size:
                cols %= size
            head = np.array([h], dtype=np.int64)
        else:
            head = self.v_heads.a[strm]
            # restart at 0 when enough cells are unused before the head: E.g. head 40, used 10, n 4
            head = np.where(head > st.used[strm] + 2 * n, 0, head)
            # E.g. size 8, head [6, 2], n 2 -> cells [[6, 7], [2, 3]]
            cols = (head[:, None] + np.arange(n)) % size
        offs = strm[:, None] * size if memo is None else memo.offs
        if self._usable_at(offs + cols).all():
            strm32 = strm.astype(np.int32) if memo is None else memo.strm32
            return SlotInfo(strm32, cols.astype(np.int32))
        if strm.size == 1:
            # one stream: the per-stream scan over contiguous slices (no gathers, no
            # cumsum) finds the same cells; a restore of thousands of cells lands here
            found = self._search(self.v_cells[int(strm[0])], int(head[0]), n, False)
            if found is None:
                return None
            strm32 = strm.astype(np.int32) if memo is None else memo.strm32
            return SlotInfo(strm32, found.astype(np.int32).reshape(1, n))
        idxs = np.empty((strm.size, n), dtype=np.int32)
        todo = np.arange(strm.size)
        width = min(size, max(SLOT_WINDOW, 4 * n))
        while True:
            # E.g. size 8, head [6], width 4 -> cells [[6, 7, 0, 1]]
            cols = (head[todo, None] + np.arange(width)) % size
            usable = self._usable_at(strm[todo, None] * size + cols)
            # the first n usable cells of a row: E.g. [F, T, T, T], n 2 -> rank [0, 1, 2, 3]
            rank = np.cumsum(usable, axis=1)
            done = rank[:, -1] >= n
            take = usable[done] & (rank[done] <= n)  # exactly n per row, in scan order
            idxs[todo[done]] = cols[done][take].reshape(-1, n)
            todo = todo[~done]
            if todo.size == 0:
                return SlotInfo(strm.astype(np.int32) if memo is None else memo.strm32, idxs)
            if width == size:
                return None
            width = min(size, width * 4)

    def _usable_at(self, gid: np.ndarray) -> np.ndarray:
        """:meth:`_usable` of cells given by global id (any shape)."""
        st = self.cells
        pos = st.pos_f[gid]
        usable = pos < 0
        if self.swa_type != SWAType.NONE:
            own = st.owner_f[gid]
            single = own >= 0
            if single.any():
                # E.g. size 8, cell 9 (stream 1) owned by seq 1 -> key 257, pos_max + 1 there;
                # with one stream the key is the owner
                key = own[single]
                if self.n_stream > 1:
                    key = (gid[single] // self.kv_size) * LLAMA_MAX_SEQ + key
                p1 = st.pos_max_at(key) + 1
                usable[single] = masked_swa(self.n_swa, self.swa_type, pos[single], p1)
        return usable

    def _search(self, cells: KVCells, head: int, n: int, cont: bool) -> np.ndarray | None:
        size = cells.size
        if not cont:
            # scan order: head .. size-1, then 0 .. head-1, in chunks that double, so a
            # cache with free cells near the head is not scanned whole
            # E.g. head 5, usable cells [1, 2, 6, 9], n 3 -> [6, 9, 1]
            found: list[np.ndarray] = []
            need = n
            chunk = max(1024, 4 * n)
            for a, b in ((head, size), (0, head)):
                x = a
                while x < b and need > 0:
                    y = min(b, x + chunk)
                    take = np.flatnonzero(self._usable(cells, x, y))[:need]
                    if take.size:
                        found.append(take + x)
                        need -= take.size
                    x = y
                    chunk *= 2
            if need > 0:
                return None
            return np.concatenate(found) if len(found) > 1 else found[0]
        # windows [s, s + n) of usable cells that do not wrap; the scan finds the first
        # one at or after head, else the first one from 0
        # E.g. usable [1, 1, 0, 1, 1, 1], n 2 -> run sums [2, 1, 1, 2, 2] -> starts [0, 3, 4]
        usable = self._usable(cells)
        csum = np.concatenate(([0], np.cumsum(usable, dtype=np.int64)))
        starts = np.flatnonzero(csum[n:] - csum[: size - n + 1] == n)
        if starts.size == 0:
            return None
        k = int(np.searchsorted(starts, head))
        s = int(starts[k]) if k < starts.size else int(starts[0])
        return np.arange(s, s + n, dtype=np.int64)

    def apply_ubatch(self, sinfo: SlotInfo, ubatch: UBatch) -> None:
        """Put the ubatch's tokens into the planned cells, every stream at once.

        A cell being overwritten (an SWA-masked cell of one sequence) is emptied first;
        afterwards every sequence that lost a cell is purged of all positions up to the
        largest overwritten one, so that ``[pos_min, pos_max]`` stays fully present. The
        head of each stream moves past the last cell of its slot.
        """
        self.check_open()
        n_per = sinfo.size
        if ubatch.n_tokens != n_per * sinfo.n_stream:
            raise BatchError(
                f"apply_ubatch: ubatch has {ubatch.n_tokens} tokens, the slot "
                f"{n_per * sinfo.n_stream}"
            )
        self._mutated()
        st = self.cells
        memo = self._memo_for(sinfo)
        native = (
            USE_NATIVE
            and memo is not None
            and ubatch.seq_id is memo.seq_id
            and memo.new_rows.simple
            and ubatch.pos.dtype == np.int32
            and sinfo.idxs.dtype == np.int32
            and st.ext is None
            and not st.journaling
        )
        if native and self._place_native(memo, sinfo, ubatch, heads=True):
            return  # every cell was empty: placed, heads moved, nothing to purge
        if (
            native
            and self.n_stream == 1
            and OVERWRITE_OWNED
            and self._overwrite_native(sinfo, ubatch)
        ):
            return  # window-masked cells overwritten, their sequences purged, heads moved
        strm = sinfo.strm.astype(np.int64) if memo is None else memo.strm
        assert strm is not None
        idx = sinfo.idxs.astype(np.int64)
        n_tok = ubatch.n_tokens
        pos_all = ubatch.pos
        # E.g. size 8, strm [0, 2], idxs [[3, 4], [0, 1]] -> gid [[3, 4], [16, 17]]
        gid = (strm[:, None] * self.kv_size if memo is None else memo.offs) + idx
        occupied = gid[st.pos_f[gid] >= 0]
        max_rm = None
        if occupied.size:
            own = st.owner_f[occupied]
            assert (own >= 0).all(), "overwriting a cell that is not held by exactly one sequence"
            p_rm = st.pos_f[occupied]
            max_rm = np.full(LLAMA_MAX_SEQ, -1, dtype=np.int64)
            # the largest removed position per sequence: a plain assignment when the owners
            # are distinct (one token per sequence, the decode step), checked: a repeated
            # owner whose larger position lost the write goes through ufunc.at.
            # E.g. owners [2, 5, 2], pos [7, 3, 9] -> max_rm[2] = 9 (either way), [5] = 3
            max_rm[own] = p_rm
            if occupied.size > 1 and (max_rm[own] < p_rm).any():
                np.maximum.at(max_rm, own, p_rm.astype(np.int64))
            if self.n_stream == 1 and not st.n_multi[0] and OVERWRITE_OWNED:
                st.rm_owned(occupied, own, p_rm)
            else:
                st.rm(occupied, exact_bounds=True)
        ext = None
        if st.ext is not None:
            ext = np.empty((n_tok, 3), dtype=np.int32)
            if ubatch.is_pos_2d():
                ext[:, 0] = pos_all[2 * n_tok : 3 * n_tok]
                ext[:, 1] = pos_all[n_tok : 2 * n_tok]
            else:
                ext[:, 0:2] = 0
            if ubatch.token is not None:
                ext[:, 2] = ubatch.token
            else:
                ext[:, 2] = self._ple_embd_token()
        if native and occupied.size and self._place_native(memo, sinfo, ubatch, heads=False):
            pass  # set_new in one native call (the overwritten cells were emptied above)
        elif memo is not None and ubatch.seq_id is memo.seq_id:
            st.set_new(strm, idx, pos_all[:n_tok], ubatch.seq_id, ext, gid, memo.new_rows)
        else:
            st.set_new(strm, idx, pos_all[:n_tok], ubatch.seq_id, ext)
        if max_rm is not None and self.n_stream == 1 and not st.n_multi[0] and OVERWRITE_OWNED:
            self._heads_back_to(st.purge_owned_upto(max_rm))
        elif max_rm is not None:
            seqs = np.flatnonzero(max_rm >= 0)
            rows = self.seq_to_stream[seqs].astype(np.int64)
            self._heads_back_to(st.seq_rm_upto(seqs, rows, max_rm[seqs]))
        self.v_heads.a[strm] = idx[:, -1] + 1

    def _place_native(
        self, memo: _StepMemo | None, sinfo: SlotInfo, ubatch: UBatch, *, heads: bool
    ) -> bool:
        """``set_new`` of a replayed ubatch's tokens (one id each) into the slot's cells, and
        with ``heads`` the heads' move, in one native call; False, nothing changed, when a
        cell is taken (numpy then overwrites)."""
        assert memo is not None and memo.strm is not None
        c, heads_buf, top, placed = self._native_cells()
        n_blocks, n_per = sinfo.idxs.shape
        # one id per token ([n, 1] int32): the matrix is the id column
        status = lib.pm_step_kv_place(
            c, ffi.from_buffer("int64_t[]", memo.strm), n_blocks, n_per,
            ffi.from_buffer("int32_t[]", sinfo.idxs), ffi.from_buffer("int32_t[]", ubatch.pos),
            ffi.from_buffer("int32_t[]", ubatch.seq_id), heads_buf if heads else ffi.NULL, top,
            placed,
        )  # fmt: skip
        if status != lib.PM_OK:
            check(
                status, f"pm_step_kv_place ({n_blocks} x {n_per} tokens, {self.n_stream} streams)"
            )
        if not placed[0]:
            return False
        if heads and top[0] >= 0:  # get_n_kv of this slot needs no look at the streams
            self._placed_top = (sinfo, self._version, int(top[0]))
        return True

    def _overwrite_native(self, sinfo: SlotInfo, ubatch: UBatch) -> bool:
        """The SWA overwrite of a one-stream cache (taken cells emptied, tokens placed,
        the losers' older positions purged, heads moved) in one ``pm_step_kv_overwrite``
        call; False, nothing changed, where the kernel does not apply (a taken cell of
        several or no sequence): the numpy path then decides."""
        c, heads_buf, top, placed = self._native_cells()
        n = sinfo.idxs.size
        status = lib.pm_step_kv_overwrite(
            c, n, ffi.from_buffer("int32_t[]", sinfo.idxs), ffi.from_buffer("int32_t[]", ubatch.pos),
            ffi.from_buffer("int32_t[]", ubatch.seq_id), heads_buf, top, placed,
        )  # fmt: skip
        if status != lib.PM_OK:
            check(status, f"pm_step_kv_overwrite ({n} tokens of {self.kv_size} cells)")
        if not placed[0]:
            return False
        if top[0] >= 0:
            self._placed_top = (sinfo, self._version, int(top[0]))
        return True

    def _ple_embd_token(self) -> int:
        """``ext.tok`` of an embedding token in a PLE model (the reference's choice)."""
        return self.spec.ple_embd_token if self.spec.ple_n_heads > 0 else -1

    def get_n_kv(self, sinfo: SlotInfo) -> int:
        """Cells the graph attends: ``min(size, max(P, PAD(used_max_p1, P)))`` over the
        slot's streams, ``P = max(n_pad, 256)``. E.g. used_max_p1 [300, 20], size 4096 ->
        [512, 256] -> 512."""
        pad = max(self.n_pad, N_PAD_GRAPH)
        placed = self._placed_top
        if placed is not None and placed[0] is sinfo and placed[1] == self._version:
            # the native placement of this very slot, nothing changed since: its streams'
            # largest used_max_p1 (none of them dirty)
            return min(self.kv_size, max(pad, -(-placed[2] // pad) * pad))
        memo = self._memo_for(sinfo)
        strm = sinfo.strm.astype(np.int64) if memo is None or memo.strm is None else memo.strm
        # the bound grows with used_max_p1: take it at the largest one
        top = int(self.cells.used_max_p1_of(strm).max())
        return min(self.kv_size, max(pad, -(-top // pad) * pad))

    # --- update (stream copies, K-shift) ------------------------------------------------
    def update(self, do_shift: bool) -> bool:
        """Run pending stream copies, then the K-shift if ``do_shift``. True if K changed."""
        if do_shift and not self.get_can_shift():
            raise UnsupportedError("K-shift: this cache / model configuration does not support it")
        self._mutated()
        copies, self._pending_copies = self._pending_copies, []
        for ssrc, sdst in copies:
            src_rows = np.arange(ssrc * self.kv_size, (ssrc + 1) * self.kv_size, dtype=np.int64)
            dst_rows = np.arange(sdst * self.kv_size, (sdst + 1) * self.kv_size, dtype=np.int64)
            tensors = [t for lay in self.layers for t in (lay.k, lay.v) if t is not None]
            with unreported(tensors):  # (the cache sets the destination's bound itself)
                for t in tensors:
                    t.copy_rows(src_rows, t, dst_rows)
            # the destination's rows are the source's now: zero from the source's bound on
            self.cells.rows_hi[sdst] = self.cells.rows_bound(ssrc)
        updated = False
        if do_shift:
            rope_layers = [lay for lay in self.layers if has_rope(self.spec.layers[lay.il])]
            if rope_layers:
                apply_k_shift(self.layout, self.spec, rope_layers, self.k_shift(), self._runner)
                updated = True
            self.cells.reset_shift()
        return updated

    def k_shift(self) -> np.ndarray:
        """The K-shift graph input: the pending shift of every cell, streams concatenated
        (int32 ``[kv_size * n_stream]``), 0 for empty cells.

        E.g. pos [0, -1, 4], shift [2, 7, 2] -> [2, 0, 2].
        """
        return np.where(self.cells.pos_f >= 0, self.cells.shift_f, 0).astype(np.int32)

    # --- state -------------------------------------------------------------------------
    def state_write_into(self, writer: StateWriter, seq_id: int = -1, flags: int = 0) -> None:
        """Serialise this cache's part of a state blob into ``writer`` (format b.2)."""
        self.check_open()
        check_state_flags(flags, "state_write")
        seq_id = self._check_seq(seq_id, "seq_id", allow_all=True)
        state_io.write_kv_state(
            self.layout, self.v_cells, self.layers, writer, seq_id, self._native_section()
        )

    def _native_section(self) -> state_io.NativeSection | None:
        """The one-call state I/O's parameters (built on first use: the tensors are fixed
        for the cache's life); None where it does not apply. Not built while
        ``state_io.NATIVE_RUNS`` is off: that None would outlive the switch."""
        if self._section is False:
            if not state_io.NATIVE_RUNS:
                return None
            self._section = state_io.native_section(self.layout, self.layers)
        return self._section if isinstance(self._section, state_io.NativeSection) else None

    def _seq_blob(self, seq_id: int, flags: int, what: str) -> state_io.SeqBlob | None:
        """The one-call per-sequence blob paths (:class:`state_io.SeqBlob`) when ``seq_id``
        is one sequence of this open cache in host memory; None sends the caller to the
        general path (which also raises for a bad ``seq_id`` or a closed cache). Kept to a
        few lines: a runtime's save or rollback of one sequence pays them on every call."""
        blob = self._blob_view()
        if blob is None or type(seq_id) is not int or not 0 <= seq_id < blob.n_seq:
            return None
        if flags:
            check_state_flags(flags, what)
        return blob

    def _blob_view(self) -> state_io.SeqBlob | None:
        """This open cache's :class:`state_io.SeqBlob` (built at first use), or None where
        its tensors are not in host memory or ``state_io.NATIVE_RUNS`` is off."""
        blob = self._blob
        if blob is False:  # not built yet
            if self._closed or not state_io.NATIVE_RUNS:
                return None
            blob = self._blob = state_io.seq_blob(
                self.layout, self.v_cells, self.v_heads, self._native_section()
            )
            if blob is not None:
                blob.swap_in_with(self._native_cells()[0])
        if blob is None or not state_io.NATIVE_RUNS or self._closed:
            return None
        return blob

    def seq_writer(self, seq_id: int, flags: int) -> SeqWriter | None:
        """The one-call blob (:class:`state_io.SeqBlob`) as a sized writer: the search
        sizes it, the fill writes what the search found (a composite's parts each take
        theirs into one buffer). ``seq_id`` -1: the whole cache, one native call per
        stream (:func:`state_io.whole_writer`), where its tensors are in host memory."""
        if seq_id == -1:
            return self._whole_writer(flags)
        blob = self._seq_blob(seq_id, flags, "state_write")
        size = None if blob is None else blob.size(seq_id)
        if blob is None or size is None:
            return None
        version = self._version

        def fill(view: memoryview) -> int:
            if self._version != version:  # the size no longer holds
                raise StateError("state_write: the cache changed between sizing and writing")
            done = blob.write(view, seq_id, "state_write", reuse=True)
            assert done is not None, "a byte view is always writable here"
            return done

        return size, fill

    def _whole_writer(self, flags: int) -> SeqWriter | None:
        self.check_open()
        if flags:
            check_state_flags(flags, "state_write")
        section = self._native_section()
        whole = (
            None if section is None else state_io.whole_writer(self.layout, self.v_cells, section)
        )
        if whole is None:
            return None
        size, fill_all = whole
        version = self._version

        def fill(view: memoryview) -> int:
            if self._version != version:  # the size no longer holds
                raise StateError("state_write: the cache changed between sizing and writing")
            return fill_all(view)

        return size, fill

    def state_write_buffer(self, out: Any, seq_id: int = -1, flags: int = 0) -> int:
        """Write the state into the caller's writable buffer ``out`` (at its start); returns
        its size. RangeError, nothing written, when ``out`` is too small. One sequence of a
        cache in host memory is one native call (:class:`state_io.SeqBlob`)."""
        blob = self._seq_blob(seq_id, flags, "state_write_buffer")
        if blob is not None:
            done = blob.write(out, seq_id, "state_write_buffer")
            if done is not None:
                return done
        return super().state_write_buffer(out, seq_id, flags)

    def state_read(
        self, data: bytes | bytearray | memoryview, seq_id: int = -1, flags: int = 0
    ) -> int:
        """Restore from a blob; returns the bytes consumed. Nothing changes on failure.

        A sequence that goes back into exactly the cells it holds (a rollback to the state
        just saved) is parsed, checked and stored in one native call
        (:meth:`state_io.SeqBlob.read`); anything else takes the two-phase restore (for a
        sequence placed anew, a native parse, placement and store:
        :class:`state_io.PlacedSeqPlan`).
        """
        if type(seq_id) is int and seq_id == -1 and type(flags) is int and flags == 0:
            done = self._read_whole_into_empty(data)
            if done is not None:
                return done
        blob = self._seq_blob(seq_id, flags, "state_read")
        if blob is None:  # the whole cache (its reader), or no one-call road: the base's
            return super().state_read(data, seq_id, flags)
        done = blob.read(data, seq_id)
        if done is not None:
            self._mutated()
            return done
        # the one call declined: the general parse, without asking the same question again
        reader = StateReader(data)
        plan = self._parse(reader, seq_id, flags, same_cells=False)
        plan.committed_at_once()
        plan.commit()
        return reader.offset

    def state_read_parse(
        self, reader: StateReader, seq_id: int = -1, flags: int = 0
    ) -> state_io.KVPartPlan:
        """Parse and validate this cache's part of a blob; change nothing.

        Returns a plan whose ``commit()`` applies it. Raises StateError naming the field
        that did not match. Nothing may change the cache between parse and commit. A
        sequence going back into exactly the cells it holds, from a blob in host memory,
        is checked in one native call and stored in one more (:class:`SameCellsPlan`); one
        placed anew whose free cells prove the fit, likewise, with the placement between
        (:class:`PlacedSeqPlan`).
        """
        return self._parse(reader, seq_id, flags, same_cells=True)

    def _parse(
        self, reader: StateReader, seq_id: int, flags: int, same_cells: bool
    ) -> state_io.KVPartPlan:
        """:meth:`state_read_parse`; ``same_cells`` False skips the native same-cells
        check (a caller whose one-call restore just declined the blob)."""
        self.check_open()
        check_state_flags(flags, "state_read")
        seq_id = self._check_seq(seq_id, "seq_id", allow_all=True)
        hooks = self._state_hooks()
        if seq_id == -1:
            whole = self._whole_blob_plan(reader, hooks)
            if whole is not None:
                return whole
        blob = self._seq_blob(seq_id, 0, "state_read") if seq_id >= 0 else None
        rest = reader.host_rest() if blob is not None else None
        found = None if rest is None else self._native_seq_plan(blob, rest, seq_id, same_cells)
        if found is not None:
            reader.skip(found[0], "kv state")
            return found[1]
        return state_io.parse_kv_state(
            self.layout, self.v_cells, self.v_heads, self.layers, hooks, reader, seq_id
        )

    def _state_hooks(self) -> state_io.KVStateHooks:
        """The cache operations a restore drives (the same for every restore: built once)."""
        hooks = self._hooks
        if hooks is None:
            hooks = self._hooks = state_io.KVStateHooks(
                version=lambda: self._version,
                mark_mutated=self._mutated,
                clear=self.clear,
                planning=self._planning,
                place=self._place_restored,
                place_seq=self._place_seq_native,
                refill=self._refill,
            )
        return hooks

    def seq_reader(self, seq_id: int, flags: int) -> SeqReader | None:
        """A composite's part of a one-sequence restore as a native check and store (see
        :meth:`TwoPhaseStateIO.seq_reader`): the sequence back into exactly the cells it
        holds (:meth:`state_io.SeqBlob.read`), or placed anew where the free cells prove
        the fit (:class:`state_io.PlacedSeqPlan`). None for anything else: a closed cache,
        tensors outside host memory, ``seq_id`` outside ``[0, n_seq_max)``."""
        if seq_id == -1:
            return self._whole_reader()
        blob = self._seq_blob(seq_id, 0, "state_read")  # (None for a seq_id not an int)
        if blob is None or seq_id >= self.n_seq_max:
            return None

        def check(
            view: memoryview,
        ) -> tuple[int, Callable[[], None], Callable[[], bool]] | None:
            found = self._native_seq_plan(blob, view, seq_id, True)
            if found is None:
                return None
            taken, plan = found
            plan.committed_at_once()  # its store runs right after every part's check
            return taken, plan.commit, plan.is_current

        return check

    def whole_part(self) -> _KVWholePart | None:
        """This cache's part of a composite's whole read in one native call (see
        :meth:`TwoPhaseStateIO.whole_part`): the parse and commit of :meth:`_whole_reader`.
        None for a closed cache, tensors outside host memory or ext records."""
        blob = self._blob_view()
        if blob is None or self.layout.n_ext:
            return None
        return _KVWholePart(self, blob)

    def _read_whole_into_empty(self, data: object) -> int | None:
        """A whole restore into a cache whose every stream is empty (a cleared one's) in
        one native call that places each record as it checks it (a one-part
        :c:func:`pm_whole_read`; :meth:`_whole_reader` checks them all, then places
        them): the bytes consumed, or None with nothing changed where it does not apply
        (a cell in use, no native road, ext records, a blob it declines: the reader and
        the two-phase parse then decide, and name what is wrong)."""
        cells, none = self.cells, self._no_cells
        # (bytes compared: numpy's any() costs microseconds a call on this path)
        if cells.used_max_p1.tobytes() != none or cells.used.tobytes() != none:
            return None
        program = self._whole_one
        if program is None:
            program = self._whole_one = whole_program([self.whole_part()])
            if program is None:
                return None  # (not kept: a native road switched off may come back)
        if not program_ready(program):
            return None
        return native_parts_read(*program, data, -1)

    def _whole_reader(self) -> SeqReader | None:
        """The whole cache's restore as a native check and store (:meth:`seq_reader` for
        ``seq_id`` -1): the parse (:meth:`state_io.SeqBlob.read_whole`), then placement,
        bytes and zeroing in one more call (:meth:`state_io.SeqBlob.commit_whole`;
        :class:`state_io.WholeBlobPlan` where that does not apply). None for a closed
        cache, tensors outside host memory or ext records (the two-phase parse runs)."""
        blob = self._blob_view()
        if blob is None or self.layout.n_ext:
            return None

        def check(
            view: memoryview,
        ) -> tuple[int, Callable[[], None], Callable[[], bool]] | None:
            found = blob.read_whole(view, 0)
            if found is None:
                return None

            def apply() -> None:
                if blob.commit_whole(view, found):
                    self._whole_committed()
                    return
                plan = state_io.WholeBlobPlan(
                    blob, view[: found.consumed], found, self.layout, self.v_cells,
                    self.v_heads, self._state_hooks(), self.layers,
                )  # fmt: skip
                plan.committed_at_once()
                plan.commit()

            return stamped_store(found.consumed, lambda: self._version, apply)

        return check

    def _whole_committed(self) -> None:
        """What Python keeps after a whole restore committed in one native call: a new
        version (the call left no pending shift and ``has_shift`` 0 itself)."""
        self._mutated()

    def _native_seq_plan(
        self, blob: state_io.SeqBlob | None, view: memoryview, seq_id: int, same_cells: bool
    ) -> tuple[int, state_io.SameCellsPlan | state_io.PlacedSeqPlan] | None:
        """A per-sequence restore of the blob at the start of ``view`` parsed in one native
        call: (its bytes, the plan). The sequence back into exactly the cells it holds
        (:meth:`state_io.SeqBlob.read`; skipped without ``same_cells``, for a caller whose
        one-call restore just declined it), or placed anew where the cells it may take
        without a window's help prove the fit (:meth:`state_io.SeqBlob.read_place`, as the
        general parse's count proves it). None sends the caller to the general parse,
        which also names what is wrong."""
        if blob is None:
            return None
        hooks = self._state_hooks()
        token = object()  # the check's runs (or positions), kept for the plan's commit
        taken = blob.read(view, seq_id, store=False, token=token) if same_cells else None
        if taken is not None:
            plan = state_io.SameCellsPlan(blob, view[:taken], seq_id, hooks, self.layers, token)
            return taken, plan
        if self.swa_type != SWAType.NONE and not state_io.SWA_DEFERRED:
            return None
        found = blob.read_place(view, seq_id, token)
        if found is None or found.n > found.free:
            return None
        placed = state_io.PlacedSeqPlan(
            blob, view[: found.consumed], seq_id, found, self.layout, self.v_cells, hooks,
            self.layers, token,
        )  # fmt: skip
        return found.consumed, placed

    def _place_seq_native(
        self, seq_id: int, pos: np.ndarray
    ) -> tuple[np.ndarray, state_io.Runs] | None:
        """:meth:`_place_restored` of ``seq_id``'s positions ``pos``: seq_rm, then
        find_slot's search and apply_ubatch's placement (with a window, its overwrite of
        masked cells) in one native call (``pm_step_kv_restore_seq``; the numpy find_slot
        and apply are the reference it is tested against). The cells in slot order
        (int64) and their runs; None, nothing placed, where it does not apply (an undo
        journal, ``state_io.NATIVE_PLACE`` off, or what the kernel declines: the numpy
        placement then runs, after the same seq_rm)."""
        if not state_io.NATIVE_PLACE or self.cells.journaling:
            return None
        self.seq_rm(seq_id, -1, -1)
        c, heads, _, placed = self._native_cells()
        n = pos.size
        strm = int(self.seq_to_stream[seq_id])
        idx = np.empty(n, dtype=np.int32)
        runs = np.empty((2, n), dtype=np.int64)
        n_runs = ffi.new("int64_t *")
        rp = ffi.from_buffer("int64_t[]", runs, require_writable=True)
        status = lib.pm_step_kv_restore_seq(
            c, strm, seq_id, ffi.from_buffer("int32_t[]", np.ascontiguousarray(pos, np.int32)), n,
            int(self.swa_type), self.n_swa, heads, ffi.from_buffer("int32_t[]", idx, require_writable=True),
            rp, rp + n, n_runs, placed,
        )  # fmt: skip
        check(status, f"pm_step_kv_restore_seq ({n} cells, stream {strm})")
        if not placed[0]:
            return None
        self._mutated()
        k = int(n_runs[0])
        return idx.astype(np.int64), (runs[0, :k], runs[1, :k])

    def _whole_blob_plan(
        self, reader: StateReader, hooks: state_io.KVStateHooks
    ) -> state_io.WholeBlobPlan | None:
        """A whole restore parsed in one native call (:meth:`state_io.SeqBlob.read_whole`)
        where the cache's tensors are in host memory and every record of the blob is a
        fixed one; None sends the caller to the general parse."""
        blob = self._blob_view()
        rest = reader.host_rest() if blob is not None else None
        if blob is None or rest is None:
            return None
        found = blob.read_whole(rest, 0)
        if found is None:
            return None
        reader.skip(found.consumed, "kv state")
        return state_io.WholeBlobPlan(
            blob, rest[: found.consumed], found, self.layout, self.v_cells, self.v_heads, hooks,
            self.layers,
        )  # fmt: skip

    def _place_restored(self, seq_id: int, ubatch: UBatch) -> SlotInfo | None:
        """Where a per-sequence restore puts ``seq_id``'s cells: the sequence is removed,
        then placed as one ubatch (``find_slot`` + ``apply_ubatch``); None if it does not fit."""
        self.seq_rm(seq_id, -1, -1)
        step_memo = self._memo  # the decode steps' memo outlives this one-off placement
        try:
            sinfo = self.find_slot(ubatch, False)
            if sinfo is not None:
                self.apply_ubatch(sinfo, ubatch)
        finally:
            self._memo = step_memo
        return sinfo

    def _clear_native(self) -> bool:
        """``clear``'s cells, pending shifts and heads emptied in one native call
        (``pm_step_kv_clear``; ``StackedCells.reset`` is the reference it is tested
        against): a clear after a decode step pays one call, not the several numpy writes
        of the reset, each microseconds once the step has evicted the caches. False,
        nothing changed, under an undo journal or with ``state_io.NATIVE_PLACE`` off."""
        if not state_io.NATIVE_PLACE or self.cells.journaling:
            return False
        c, heads, _, _ = self._native_cells()
        check(lib.pm_step_kv_clear(c, heads), "pm_step_kv_clear")
        if self.cells.ext is not None:
            self.cells.ext[:] = EXT_DEFAULT
        return True

    def _refill(self, records: Sequence[state_io.StreamRecords | None]) -> bool:
        """A whole restore's ``clear(False)`` and the placement of every stream's meta
        records (None for a stream without cells) into its cells ``[0, n)`` in one native
        call (``pm_step_kv_refill``; ``clear`` + ``set_new`` are the reference it is tested
        against). Variable records (cells of several sequences) are taken without ext
        only. False, nothing changed, under an undo journal (a plan being simulated) or
        with ``state_io.NATIVE_PLACE`` off; StateError, nothing changed, for a record that
        is not a valid one (the blob changed after the parse that found it so)."""
        if not state_io.NATIVE_PLACE or self.cells.journaling:
            return False
        c, _, _, placed = self._native_cells()
        spans_c = ffi.NULL  # fixed records only
        counts = np.array([0 if r is None else r.n for r in records], dtype=np.int64)
        words = ffi.new(
            "int32_t *[]",
            [ffi.NULL if r is None else ffi.from_buffer("int32_t[]", r.words) for r in records],
        )
        counts_c = ffi.from_buffer("int64_t[]", counts)
        if self.cells.ext is None:  # (ext is copied below from fixed records only)
            spans = np.array([0 if r is None else r.words.size for r in records], np.int64)
            spans_c = ffi.from_buffer("int64_t[]", spans)
        rec = self.layout.record_words
        status = lib.pm_step_kv_refill(
            c, words, counts_c, spans_c, rec, self.layout.n_seq_max, placed
        )
        if status != lib.PM_OK:
            check(status, f"pm_step_kv_refill ({int(counts.sum())} cells)")
        if not placed[0]:
            raise StateError(BLOB_CHANGED)
        st = self.cells  # (the refill left has_shift 0)
        if st.ext is not None:
            st.ext[:] = EXT_DEFAULT
            for strm, r in enumerate(records):
                if r is not None:
                    st.ext[strm, : r.n] = r.words[: r.n * rec].reshape(r.n, rec)[:, 2:5]
        self.v_heads[:] = 0
        self._mutated()
        return True

    def state_clear(self, seq_id: int = -1) -> None:
        """Undo a restore of ``seq_id`` (-1: everything) that another part failed to complete:
        remove the sequence and zero the rows only it held (``llama_kv_cache::state_clear``)."""
        seq_id = self._check_seq(seq_id, "seq_id", allow_all=True)
        if seq_id == -1:
            self.clear(True)
            return
        strm = int(self.seq_to_stream[seq_id])
        cells = self.v_cells[strm]
        only = np.flatnonzero(cells.owner == seq_id)
        self.seq_rm(seq_id, -1, -1)
        state_io.zero_cells(self.layout, self.layers, strm, only)


class KVCacheContext(MemoryContext):
    """One planned pass over a batch's ubatches, an update, or a full-size reservation."""

    def __init__(
        self,
        kv: KVCache,
        status: MemoryStatus,
        sinfos: list[SlotInfo] | None = None,
        ubatches: list[UBatch] | None = None,
    ) -> None:
        self.kv = kv
        self.status = status
        self.sinfos = sinfos or []
        self.ubatches = ubatches or []
        self.i_cur = 0
        self.n_kv = 0
        self.do_shift = False
        self._update = False
        self._full = False

    def get_status(self) -> MemoryStatus:
        return self.status

    def _require_batch(self, what: str) -> None:
        if self.status != MemoryStatus.SUCCESS or self._update:
            raise BatchError(f"{what}: this context has no ubatch (status {self.status.name})")

    def next(self) -> bool:
        self._require_batch("next")
        self.i_cur += 1
        return self.i_cur < len(self.ubatches)

    def apply(self) -> bool:
        """Commit the current ubatch's slot (or run the update). The only mutating call."""
        if self.status.is_fail():
            raise BatchError(f"apply: the context failed to prepare (status {self.status.name})")
        if self.status == MemoryStatus.NO_UPDATE:
            return True
        if self._update:
            self.kv.update(self.do_shift)
            return True
        if self._full or not self.ubatches:
            return True
        if self.i_cur >= len(self.ubatches):
            raise BatchError("apply: no ubatch left (next() returned False)")
        sinfo = self.sinfos[self.i_cur]
        self.kv.apply_ubatch(sinfo, self.ubatches[self.i_cur])
        self.n_kv = self.kv.get_n_kv(sinfo)
        return True

    def get_ubatch(self) -> UBatch:
        self._require_batch("get_ubatch")
        if self._full or self.i_cur >= len(self.ubatches):
            raise BatchError("get_ubatch: no current ubatch")
        return self.ubatches[self.i_cur]

    # --- graph inputs for the current ubatch ---------------------------------------------
    def graph_inputs(self) -> GraphInputs:
        """``{"kv": KVInputs}`` for the current ubatch (row indices built now)."""
        return GraphInputs({"kv": self.kv_inputs()})

    def kv_inputs(self) -> KVInputs:
        """This cache's :class:`KVInputs` for the current ubatch (what :meth:`graph_inputs`
        files under "kv"; an iSWA context files its two caches' under "base" / "swa")."""
        kv = self.kv
        sinfo = self.get_sinfo()
        memo = kv._memo_for(sinfo)
        if memo is None:
            k_idxs, s0 = build_k_idxs(kv.layout, sinfo), sinfo.s0
        else:  # a replayed layout: its row offsets and first stream are known
            k_idxs, s0 = (memo.offs + sinfo.idxs).ravel(), memo.s0
        return KVInputs(
            layers=kv._layer_set,
            v_trans=kv.v_trans,
            n_kv=self.n_kv,
            n_stream=sinfo.n_stream,
            s0=s0,
            size=kv.kv_size,
            k_idxs=k_idxs,
            # V rows are the K rows without v_trans (a copy: each input owns its array)
            v_idxs=self.get_v_idxs() if kv.v_trans else k_idxs.copy(),
            view=self,
        )

    def get_sinfo(self) -> SlotInfo:
        return self.sinfos[self.i_cur]

    def get_n_kv(self) -> int:
        return self.n_kv

    def get_k_idxs(self) -> np.ndarray:
        """int64 ``[n_tokens]``: the global row (``strm * kv_size + cell``) of each token's K."""
        sinfo = self.get_sinfo()
        memo = self.kv._memo_for(sinfo)
        if memo is not None:  # the row offsets of a replayed layout: build_k_idxs's values
            return (memo.offs + sinfo.idxs).ravel()
        return build_k_idxs(self.kv.layout, sinfo)

    def get_v_idxs(self) -> np.ndarray:
        """int64: V rows as K, or with ``v_trans`` element indices ``[n_tokens * n_embd_v_gqa_max]``."""
        kv = self.kv
        if not kv.v_trans:
            return self.get_k_idxs()
        sinfo = self.get_sinfo()
        memo = kv._memo_for(sinfo)
        if memo is None:
            return build_v_idxs(kv.layout, sinfo)
        if memo.v_base is None:
            # E.g. kv_size 8, E 2, strm [1] -> [[[16, 24]]]; + cell 3 -> [19, 27]
            e = kv.n_embd_v_gqa_max
            chan = np.arange(e, dtype=np.int64)[None, None, :] * kv.kv_size
            memo.v_base = memo.offs[:, :, None] * e + chan
        return (memo.v_base + sinfo.idxs[:, :, None]).ravel()

    def get_kq_mask(
        self,
        causal_attn: bool | None = None,
        dtype: Any = np.float32,
        non_causal_type: NonCausalType | None = None,
    ) -> np.ndarray:
        """The KQ mask of the current ubatch: ``[n_stream, n_tokens / n_stream, n_kv]``
        (ggml ``[n_kv, n_tps, 1, n_stream]``), 0 where attended, -inf elsewhere (ALiBi:
        ``-|p0 - p1|``)."""
        kv = self.kv
        memo = kv._memo_for(self.get_sinfo()) if kv.n_stream > 1 else None
        if USE_NATIVE and memo is not None:
            mask = self._kq_mask_native(memo, causal_attn, dtype, non_causal_type)
            if mask is not None:
                return mask
        return build_kq_mask(
            kv.layout,
            kv.v_cells,
            kv.spec,
            self.get_ubatch(),
            self.n_kv,
            causal_attn,
            dtype,
            non_causal_type,
            strm=None if memo is None else memo.strm,
        )

    def _kq_mask_native(
        self, memo: _StepMemo, causal_attn: bool | None, dtype: Any, nct: NonCausalType | None
    ) -> np.ndarray | None:
        """:meth:`get_kq_mask` of a replayed ubatch on one stream per sequence in one
        ``pm_step_kq_mask`` call (causality and window per token, owner per cell); None
        where the kernel does not apply (ALiBi, cell ext, an SWA_FULL span, another dtype,
        shared cells): ``build_kq_mask``, the reference, decides then."""
        kv = self.kv
        ubatch = self.get_ubatch()
        dt = np.dtype(dtype)
        if (
            memo.strm is None
            or ubatch.seq_id is not memo.seq_id
            or not memo.new_rows.simple
            or kv.with_ext
            or kv.spec.use_alibi
            or ubatch.pos.dtype != np.int32
            or dt not in (np.float16, np.float32)
        ):
            return None
        causal = kv.spec.causal_attn if causal_attn is None else bool(causal_attn)
        if not causal:
            kind = NonCausalType(kv.spec.non_causal_type if nct is None else nct)
            if kind == NonCausalType.SWA_ONLY:
                causal = kv.swa_type == SWAType.NONE
            elif kind == NonCausalType.SWA_FULL and kv.swa_type != SWAType.NONE:
                return None  # the window spans the ubatch's positions: numpy
        if memo.c_args is None:
            memo.c_args = (
                ffi.from_buffer("int64_t[]", memo.strm),
                ffi.from_buffer("int32_t[]", memo.seq_id),
            )
        c_strm, c_seq = memo.c_args
        n_blocks = memo.strm.size
        n_per = ubatch.n_tokens // n_blocks
        out = np.empty((n_blocks, n_per, self.n_kv), dtype=dt)
        c, _, _, done = kv._native_cells()
        status = lib.pm_step_kq_mask(
            c, c_strm, n_blocks, n_per, c_seq, ffi.from_buffer("int32_t[]", ubatch.pos),
            int(kv.swa_type), kv.n_swa, int(causal), self.n_kv, dt.itemsize,
            ffi.from_buffer(out, require_writable=True), done,
        )  # fmt: skip
        if status != lib.PM_OK:
            check(status, f"pm_step_kq_mask ({n_blocks} x {n_per} tokens, n_kv {self.n_kv})")
        return out if done[0] else None

    # --- graph helpers (pymem.ggml) -----------------------------------------------------------
    def get_k(self, ctx: Any, il: int) -> Any:
        kv = self.kv
        return kv_graph.get_k(
            kv.layout, kv.layer(il), kv.spec.layers[il], ctx, self.n_kv, self.get_sinfo()
        )

    def get_v(self, ctx: Any, il: int) -> Any:
        kv = self.kv
        return kv_graph.get_v(
            kv.layout, kv.layer(il), kv.spec.layers[il], ctx, il, self.n_kv, self.get_sinfo()
        )

    def cpy_k(self, ctx: Any, k_cur: Any, k_idxs: Any, il: int) -> Any:
        return kv_graph.cpy_k(self.kv.layout, self.kv.layer(il), ctx, k_cur, k_idxs)

    def cpy_v(self, ctx: Any, v_cur: Any, v_idxs: Any, il: int) -> Any:
        return kv_graph.cpy_v(self.kv.layout, self.kv.layer(il), ctx, v_cur, v_idxs, il)


class _KVWholePart:
    """A KV cache's :class:`~pymem.state.WholePart`: its blob view, its cells and a scratch
    for the parse's counts, offsets and records spans."""

    def __init__(self, cache: KVCache, blob: state_io.SeqBlob) -> None:
        self._cache = cache
        self._blob = blob
        self._found = np.zeros(3 * cache.n_stream, dtype=np.int64)
        self._keep: list[object] = []

    def fill(self, part: Any) -> None:
        step = self._cache._native_cells()[0]
        found = ffi.from_buffer("int64_t[]", self._found, require_writable=True)
        self._keep = [step, found]
        pos, idx = self._blob.placing_scratch()
        part.kv = self._blob.view
        part.cells = step
        part.kv_found = found
        part.kv_pos, part.kv_idx, part.kv_cap = pos, idx, self._cache.layout.kv_size
        part.kv_p_lo, part.kv_p_hi = -(2**31), 2**31 - 1  # (a window's: per sequence)
        part.kv_swa_type, part.kv_n_swa = int(self._cache.swa_type), self._cache.n_swa

    def for_sequence(self, part: Any, seq_id: int) -> None:
        if self._cache.swa_type != SWAType.NONE:  # the positions the sequence's window sees
            part.kv_p_lo, part.kv_p_hi = self._blob.window(seq_id)

    def read_sequence(self, part: Any, seq_id: int) -> bool:
        cache = self._cache
        part.kv_held = cache.v_cells[int(cache.seq_to_stream[seq_id])].seq_pos_max(seq_id) >= 0
        return True

    def sequence_read(self, part: Any) -> None:
        self._cache._mutated()

    def ready(self, part: Any) -> bool:
        cache = self._cache
        return (
            not cache._closed
            and state_io.NATIVE_RUNS
            and state_io.NATIVE_PLACE
            and not cache.cells.journaling
        )

    def commit(self, part: Any) -> None:
        self._cache._whole_committed()

    def written(self) -> None:
        self._blob.scratch_taken()
