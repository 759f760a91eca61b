"""ggml graph helpers for recurrent layers (the reference's ``build_rs_inp`` / ``build_rs``).

Owns :class:`RSGraphInputs` (the ``s_copy`` input tensor of a ubatch and its views),
:func:`build_rs_inputs`, :func:`build_rs` (gather the states a ubatch starts from, zero
``rs_z``, copy the extra states back) and :func:`rs_store_view` (where the new states,
and the rollback snapshots of plane ``k``, are stored). Nodes are made through a
:class:`pymem.ggml.Context`; nothing here touches the cffi library directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pymem.backend import Tensor
from pymem.errors import RangeError
from pymem.recurrent.context import RecurrentMemoryContext


@dataclass
class RSGraphInputs:
    """Graph inputs of one ubatch for recurrent layers (``llm_graph_input_rs``).

    ``s_copy`` is an I32 ``[n_rs]`` input tensor; ``s_copy_main`` views its first
    ``n_seqs`` entries (the states the ubatch advances), ``s_copy_extra`` the rest (states
    copied back into their own cells; None when there are none). Pass ``feed()`` as the
    ``inputs`` of :meth:`pymem.ggml.GraphRunner.run`.
    """

    s_copy: Any
    s_copy_main: Any
    s_copy_extra: Any
    values: np.ndarray
    head: int
    rs_z: int
    n_rs: int
    n_seqs: int
    size: int

    def feed(self) -> dict[Any, np.ndarray]:
        return {self.s_copy: self.values}


def build_rs_inputs(
    ctx: Any, mctx: RecurrentMemoryContext, n_seqs: int | None = None
) -> RSGraphInputs:
    """Create the ``s_copy`` input (and its views) for the current ubatch of ``mctx``.

    ``ctx`` is a :class:`pymem.ggml.Context`. ``n_seqs`` defaults to the ubatch's (or to
    every cell for a full context).
    """
    n_rs = mctx.get_n_rs()
    if n_seqs is None:
        n_seqs = mctx.get_ubatch().n_seqs if mctx.ubatches else n_rs
    if not 1 <= n_seqs <= n_rs:
        raise RangeError(f"build_rs_inputs: n_seqs {n_seqs} must be in [1, n_rs = {n_rs}]")
    s_copy = ctx.new_tensor("i32", (n_rs,), name="rs_s_copy", input=True)
    main = ctx.view_1d(s_copy, n_seqs, 0)
    extra = ctx.view_1d(s_copy, n_rs - n_seqs, n_seqs * 4) if n_rs > n_seqs else None
    return RSGraphInputs(
        s_copy=s_copy,
        s_copy_main=main,
        s_copy_extra=extra,
        values=mctx.s_copy(),
        head=mctx.get_head(),
        rs_z=mctx.get_rs_z(),
        n_rs=n_rs,
        n_seqs=n_seqs,
        size=mctx.get_size(),
    )


def build_rs(ctx: Any, inp: RSGraphInputs, s: Any, state_size: int, expand: list[Any]) -> Any:
    """Gather the states a ubatch starts from (the reference's ``build_rs``).

    ``s`` is a layer's R or S (a pymem Tensor or a ``ggml_tensor *``) holding
    ``state_size`` values per row. Appends to ``expand``, in the order they must run,
    the nodes with side effects on ``s``: zeroing row ``rs_z`` (the initial state of
    new sequences) and copying the extra states ``[head + n_seqs, head + n_rs)`` from
    their sources. Returns the gathered ``[state_size, n_seqs]`` states of the ubatch's
    sequences (the node that reads them must come after ``expand``'s nodes; pass
    ``expand + [outputs...]`` to the graph runner).

    The reference zeroes in place with ``ggml_scale_inplace``; this uses
    ``cpy(scale(row, 0), row)``, the same bytes.
    """
    t = _node(s)
    n_rows = int(t.ne[1]) * int(t.ne[2]) * int(t.ne[3])
    states = ctx.reshape_2d(t, state_size, n_rows)
    nb1 = int(states.nb[1])
    if inp.rs_z >= 0:
        zero = ctx.view_1d(states, state_size, inp.rs_z * nb1)
        expand.append(ctx.cpy(ctx.scale(zero, 0.0), zero))
    out = ctx.get_rows(states, inp.s_copy_main)
    if inp.s_copy_extra is not None:
        extra = ctx.get_rows(states, inp.s_copy_extra)
        dst = ctx.view_2d(
            states, state_size, inp.n_rs - inp.n_seqs, nb1, (inp.head + inp.n_seqs) * nb1
        )
        expand.append(out)  # the gather must read before the extra copy writes
        expand.append(ctx.cpy(extra, dst))
    return out


def rs_store_view(ctx: Any, inp: RSGraphInputs, s: Any, state_size: int, plane: int = 0) -> Any:
    """A ``[state_size, n_seqs]`` view of the rows the ubatch's new states go to.

    Plane 0 holds current states (rows ``head .. head + n_seqs``); plane ``k`` the
    rollback snapshot ``k`` tokens back (rows offset by ``k * mem_size``).
    """
    t = _node(s)
    n_rows = int(t.ne[1]) * int(t.ne[2]) * int(t.ne[3])
    if plane < 0 or (plane + 1) * inp.size > n_rows:
        raise RangeError(
            f"rs_store_view: plane {plane} outside the {n_rows // inp.size} planes of {n_rows} rows"
        )
    states = ctx.reshape_2d(t, state_size, n_rows)
    nb1 = int(states.nb[1])
    return ctx.view_2d(states, state_size, inp.n_seqs, nb1, (plane * inp.size + inp.head) * nb1)


def _node(s: Tensor | Any) -> Any:
    """The ggml tensor of a pymem :class:`Tensor` (R/S from the memory), or ``s`` itself
    (a ggml node a graph already made)."""
    return s.ptr if isinstance(s, Tensor) else s
