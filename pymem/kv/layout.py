"""The small shared types of the KV cache: a slot, a cached layer, and the storage layout.

The helper modules (:mod:`~pymem.kv.inputs`, :mod:`~pymem.kv.graph`,
:mod:`~pymem.kv.shift`, :mod:`~pymem.kv.state_io`) take these instead of the whole
:class:`~pymem.kv.cache.KVCache`, so they never import it::

    layout.py  <-  inputs.py, graph.py, shift.py, state_io.py  <-  cache.py  <-  iswa.py
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pymem.backend import Tensor
from pymem.spec import SWAType
from pymem.types import GGMLType


@dataclass(frozen=True, eq=False)
class SlotInfo:
    """Where a ubatch goes: ``idxs[s][i]`` is the cell of token ``s * size + i`` in stream
    ``strm[s]`` (``llama_kv_cache::slot_info``). Indices need not be contiguous."""

    strm: np.ndarray  # int32 [ns]
    idxs: np.ndarray  # int32 [ns, size]

    @property
    def s0(self) -> int:
        return int(self.strm.min())

    @property
    def s1(self) -> int:
        return int(self.strm.max())

    @property
    def n_stream(self) -> int:
        return int(self.strm.shape[0])

    @property
    def size(self) -> int:
        return int(self.idxs.shape[1])

    def head(self) -> int:
        return int(self.idxs[0, 0])

    def __repr__(self) -> str:
        return f"SlotInfo(strm={self.strm.tolist()}, idxs={self.idxs.tolist()})"


@dataclass(frozen=True, eq=False)
class KVLayer:
    """One cached layer: model layer index, its tensors and widths."""

    il: int
    k: Tensor
    v: Tensor | None
    n_embd_k_gqa: int
    n_embd_v_gqa: int  # the true width (V may be padded to the widest layer)
    device: str


@dataclass(frozen=True, eq=False)
class KVLayout:
    """How one KV cache stores its cells: the facts the helper modules read.

    Per cached layer K is ``[n_embd_k_gqa, kv_size, n_stream]``; V the same, or with
    ``v_trans`` each stream's block transposed (``n_embd_v_gqa_max`` channels of
    ``kv_size`` elements). Row ``strm * kv_size + cell`` is cell ``cell`` of stream ``strm``.
    """

    kv_size: int  # cells per stream
    n_stream: int  # 1 (unified) or n_seq_max
    n_seq_max: int
    n_pad: int  # kv_size is a multiple of it
    v_trans: bool  # V stored transposed (no flash attention)
    swa_type: SWAType  # the window of this cache
    n_swa: int
    type_k: GGMLType
    type_v: GGMLType
    n_embd_v_gqa_max: int  # [TAG_V_CACHE_VARIABLE] a transposed V is this wide in every layer
    with_ext: bool  # cells carry (x, y, tok): M-RoPE or PLE
    n_pos_per_embd: int
    seq_to_stream: np.ndarray  # int32, read-only: the stream of each sequence id

    def k_row_size(self, n_embd_k_gqa: int) -> int:
        """Bytes of one cell's K row ``n_embd_k_gqa`` wide."""
        return self.type_k.row_size(n_embd_k_gqa)

    def v_row_size(self, n_embd_v_gqa: int) -> int:
        """Bytes of one cell's V row ``n_embd_v_gqa`` wide (not transposed)."""
        return self.type_v.row_size(n_embd_v_gqa)

    @property
    def n_ext(self) -> int:
        """Words of ext a cell's state record carries: 3 (x, y, tok) with ext, else 0."""
        return 3 if self.with_ext else 0

    @property
    def record_words(self) -> int:
        """int32 words of a state meta record holding one sequence id: pos, n_seq_id, the
        ext words, the id."""
        return 3 + self.n_ext

    @property
    def v_el_size(self) -> int:
        """Bytes of one V element (a transposed V stores single elements)."""
        return self.type_v.type_size


class StreamHeads:
    """Where the next slot search of each stream starts (``llama_kv_cache::v_heads``).

    An int64 array (``a``) that reads like the reference's vector: indexing, ``len``,
    iteration and ``==`` against a list give Python ints, and ``heads[s] = h`` /
    ``heads[:] = [...]`` write through. The batched slot search reads ``a`` directly.
    """

    __slots__ = ("a",)

    def __init__(self, n_stream: int) -> None:
        self.a = np.zeros(n_stream, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.a.size)

    def __getitem__(self, i: Any) -> Any:
        v = self.a[i]
        return int(v) if np.ndim(v) == 0 else v.tolist()

    def __setitem__(self, i: Any, value: Any) -> None:
        self.a[i] = value

    def __iter__(self) -> Iterator[int]:
        return iter(self.a.tolist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StreamHeads):
            return self.a.tolist() == other.a.tolist()
        if isinstance(other, (list, tuple)):
            return self.a.tolist() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self.a.tolist())
