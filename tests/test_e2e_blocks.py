"""The tiny model's ggml blocks against the numpy oracle, over hand-built memory inputs.

Pins the graph itself (RoPE mode, GQA, SWA masking, set_rows into K/V with and without
transposed V, flash attention, the Mamba-2 conv/scan state round trip through R and S
rows) independently of pymem's memories: cells and state rows are assigned here by the
simplest possible rule, one sequence per row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import pymem.ggml as gg
from pymem.backend import Tensor, TensorSpec, TensorStore
from pymem.runtime import Oracle, StepInputs, TinyConfig, TinyModel
from pymem.spec import RopeType, masked_swa
from pymem.ubatch import LLAMA_MAX_SEQ, UBatch


def _row(t: Any, n: int) -> int:
    return int(gg.lib.ggml_row_size(t.type, n))


class CacheViews:
    """``get_k``/``get_v``/``cpy_k``/``cpy_v`` over raw K/V tensors in the reference layout.

    K is ``[n_embd_k_gqa, kv_size, n_stream]``; V the same, or with ``v_trans`` stored
    transposed per stream (``kv_size`` consecutive values per channel). Subclasses give
    ``k_tensor(il)``, ``v_tensor(il)``, ``v_trans``, ``n_kv``, ``n_stream``, ``s0``.
    """

    v_trans: bool
    n_kv: int
    n_stream: int
    s0: int

    def k_tensor(self, il: int) -> Tensor:
        raise NotImplementedError

    def v_tensor(self, il: int) -> Tensor:
        raise NotImplementedError

    def get_k(self, ctx: gg.Context, il: int) -> Any:
        k = self.k_tensor(il).ptr
        head_dim, n_head_kv = int(k.ne[0]) // self._n_head_kv(il), self._n_head_kv(il)
        n_embd, size = int(k.ne[0]), int(k.ne[1])
        return ctx.view_4d(k, head_dim, n_head_kv, self.n_kv, self.n_stream,
                           _row(k, head_dim), _row(k, n_embd), _row(k, n_embd * size),
                           _row(k, n_embd * size) * self.s0)  # fmt: skip

    def get_v(self, ctx: gg.Context, il: int) -> Any:
        v = self.v_tensor(il).ptr
        n_head_kv = self._n_head_kv(il)
        n_embd, size = int(v.ne[0]), int(v.ne[1])
        head_dim = n_embd // n_head_kv
        if self.v_trans:
            return ctx.view_4d(v, self.n_kv, n_head_kv, head_dim, self.n_stream,
                               _row(v, size * head_dim), _row(v, size), _row(v, size * n_embd),
                               _row(v, size * n_embd) * self.s0)  # fmt: skip
        return ctx.view_4d(v, head_dim, n_head_kv, self.n_kv, self.n_stream,
                           _row(v, head_dim), _row(v, n_embd), _row(v, n_embd * size),
                           _row(v, n_embd * size) * self.s0)  # fmt: skip

    def cpy_k(self, ctx: gg.Context, k_cur: Any, k_idxs: Any, il: int) -> Any:
        k = self.k_tensor(il).ptr
        n_embd, n_tokens = int(k_cur.ne[0] * k_cur.ne[1]), int(k_cur.ne[2])
        rows = ctx.reshape_2d(k, int(k.ne[0]), int(k.ne[1] * k.ne[2]))  # the indices are global
        return ctx.set_rows(rows, ctx.view_2d(k_cur, n_embd, n_tokens, k_cur.nb[2], 0), k_idxs)

    def cpy_v(self, ctx: gg.Context, v_cur: Any, v_idxs: Any, il: int) -> Any:
        v = self.v_tensor(il).ptr
        n_embd, n_tokens = int(v_cur.ne[0] * v_cur.ne[1]), int(v_cur.ne[2])
        if not self.v_trans:
            rows = ctx.reshape_2d(v, int(v.ne[0]), int(v.ne[1] * v.ne[2]))
            return ctx.set_rows(rows, ctx.view_2d(v_cur, n_embd, n_tokens, v_cur.nb[2], 0), v_idxs)
        # one row per element: v_idxs[i * n_embd + j] = stream offset + j * kv_size + cell_i
        elems = ctx.reshape_2d(v, 1, int(gg.lib.ggml_nelements(v)))
        cur = ctx.reshape_2d(ctx.cont_2d(v_cur, n_embd, n_tokens), 1, n_embd * n_tokens)
        return ctx.set_rows(elems, cur, v_idxs)

    def _n_head_kv(self, il: int) -> int:
        raise NotImplementedError


def make_ubatch(tokens: list[list[int]], pos: list[list[int]]) -> UBatch:
    """An equal-split ubatch: sequence s holds tokens[s] at pos[s], set-major."""
    n_seqs, nst = len(tokens), len(tokens[0])
    n = n_seqs * nst
    seq = np.repeat(np.arange(n_seqs, dtype=np.int32), nst)
    seq_idx = np.full(LLAMA_MAX_SEQ, -1, dtype=np.int32)
    seq_idx[:n_seqs] = np.arange(n_seqs)
    return UBatch(
        equal_seqs=True,
        n_tokens=n,
        n_seq_tokens=nst,
        n_seqs=n_seqs,
        n_seqs_unq=n_seqs,
        n_pos=1,
        token=np.asarray(tokens, dtype=np.int32).ravel(),
        embd=None,
        pos=np.asarray(pos, dtype=np.int32).ravel(),
        n_seq_id=np.ones(n, dtype=np.int32),
        seq_id=seq[:, None].copy(),
        seq_id_unq=np.arange(n_seqs, dtype=np.int32),
        seq_idx=seq_idx,
        output=np.ones(n, dtype=np.int8),
        batch_idxs=np.arange(n, dtype=np.int32),
    )


class ManualKV(CacheViews):
    """One unified stream; each token takes the next free cell; mask from (pos, seq) per cell."""

    def __init__(
        self,
        cfg: TinyConfig,
        device: str,
        kinds: str,
        size: int,
        type_k: str,
        type_v: str,
        v_trans: bool,
    ) -> None:
        self.cfg, self.size, self.v_trans, self.n_stream, self.s0 = cfg, size, v_trans, 1, 0
        self.layers = frozenset(il for il, k in enumerate(cfg.layers) if k in kinds)
        self.swa = kinds == "S"
        ne = cfg.n_head_kv * cfg.head_dim
        specs = []
        for il in self.layers:
            specs.append(TensorSpec(f"k{il}", type_k, (ne, size, 1)))
            specs.append(TensorSpec(f"v{il}", type_v, (ne, size, 1)))
        self.store = TensorStore(device, specs)
        self.pos = np.full(size, -1, dtype=np.int64)
        self.seq = np.full(size, -1, dtype=np.int64)
        self.head = 0
        self.n_kv = size

    def place(self, ub: UBatch) -> None:
        self.cells = np.arange(self.head, self.head + ub.n_tokens)
        self.head += ub.n_tokens
        self.pos[self.cells] = ub.pos0
        self.seq[self.cells] = ub.seq_id0

    def _n_head_kv(self, il: int) -> int:
        return self.cfg.n_head_kv

    def k_tensor(self, il: int):
        return self.store[f"k{il}"]

    def v_tensor(self, il: int):
        return self.store[f"v{il}"]

    def kq_mask(self, ub: UBatch) -> np.ndarray:
        p1 = ub.pos0[:, None].astype(np.int64)
        keep = (
            (self.seq[None, :] == ub.seq_id0[:, None])
            & (self.pos[None, :] <= p1)
            & (self.pos[None, :] >= 0)
        )
        if self.swa:
            keep &= ~masked_swa(self.cfg.n_swa, self.cfg.swa_type, self.pos[None, :], p1)
        return np.where(keep, 0.0, -np.inf).astype(np.float32)[None]

    def k_idxs(self, ub: UBatch) -> np.ndarray:
        return self.cells.astype(np.int64)

    def v_idxs(self, ub: UBatch) -> np.ndarray:
        if not self.v_trans:
            return self.cells.astype(np.int64)
        ne = self.cfg.n_head_kv * self.cfg.head_dim
        # E.g. cells [3, 4], ne 2, size 8 -> [3, 11, 4, 12]
        return (self.cells[:, None] + np.arange(ne)[None, :] * self.size).ravel().astype(np.int64)


class ManualRecurrent:
    """Row s holds sequence s; every ubatch holds sequences 0..n_seqs-1 in order."""

    def __init__(self, cfg: TinyConfig, device: str, n_seq: int) -> None:
        self.layers = [il for il, k in enumerate(cfg.layers) if k == "R"]
        specs = []
        for il in self.layers:
            specs.append(TensorSpec(f"r{il}", "f32", (cfg.n_embd_r, n_seq)))
            specs.append(TensorSpec(f"s{il}", "f32", (cfg.n_embd_s, n_seq)))
        self.store = TensorStore(device, specs)
        self.head, self.n_rs, self.rs_z, self.size, self.n_rs_seq = 0, n_seq, -1, n_seq, 0

    def r_tensor(self, il: int):
        return self.store[f"r{il}"]

    def s_tensor(self, il: int):
        return self.store[f"s{il}"]

    def s_copy(self) -> np.ndarray:
        return np.arange(self.n_rs, dtype=np.int32)


@pytest.mark.parametrize(
    ("layers", "rope"),
    [
        ("AA", "norm"),
        ("SAS", "norm"),
        ("RR", "norm"),
        ("RAR", "norm"),
        ("RSAR", "norm"),
        ("RSAR", "neox"),
    ],
)
@pytest.mark.parametrize("path", ["softmax_vtrans", "flash_attn"])
def test_graph_matches_oracle_prompt_then_steps(
    device: str, layers: str, rope: str, path: str
) -> None:
    rope_type = RopeType.NEOX if rope == "neox" else RopeType.NORM
    cfg = TinyConfig(layers=layers, n_swa=4, rope_type=rope_type)
    flash = path == "flash_attn"
    rng = np.random.default_rng(1)
    n_seqs, n_prompt, n_steps = 3, 5, 4
    with TinyModel(cfg, device) as model:
        oracle = Oracle(model.weights)
        inputs = StepInputs()
        kvs = []
        for kinds in ("A", "S"):
            if kinds in cfg.layers:
                kv = ManualKV(cfg, device, kinds, 64, "f32", "f32", v_trans=not flash)
                inputs.attn[kinds] = kv
                kvs.append(kv)
        if "R" in cfg.layers:
            inputs.recr = ManualRecurrent(cfg, device, n_seqs)
        history = [list(rng.integers(0, cfg.n_vocab, n_prompt)) for _ in range(n_seqs)]
        ub = make_ubatch(history, [list(range(n_prompt))] * n_seqs)
        for kv in kvs:
            kv.place(ub)
        got = model.forward(ub, inputs, flash_attn=flash).reshape(n_seqs, n_prompt, -1)
        for s in range(n_seqs):
            np.testing.assert_allclose(got[s], oracle.logits(history[s]), atol=1e-4, rtol=0)
        for step in range(n_steps):
            new = [[int(rng.integers(0, cfg.n_vocab))] for _ in range(n_seqs)]
            ub = make_ubatch(new, [[n_prompt + step]] * n_seqs)
            for kv in kvs:
                kv.place(ub)
            got = model.forward(ub, inputs, flash_attn=flash)
            for s in range(n_seqs):
                history[s].append(new[s][0])
                np.testing.assert_allclose(got[s], oracle.logits(history[s])[-1], atol=1e-4, rtol=0)
