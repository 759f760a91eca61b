"""An independent float64 numpy forward pass of the tiny hybrid decoder: no cache, no pymem.

The oracle recomputes a sequence's logits from its whole token history every time. It
shares nothing with the ggml graph but the weights: attention is an explicit masked
softmax over every earlier token, RoPE is written out from ggml's formula, the Mamba-2
conv and selective scan are loops over tokens. If the graph over pymem's memory (cells
placed by find_slot, K/V written through row indices, masks, K-shifts, state copies,
rollback snapshots, save/restore) produces the same logits, the memory did its job.

Edits to a sequence's past (a context shift) are described, not simulated: ``visible``
says which earlier tokens each token's attention saw, and ``key_pos`` at which position
it saw their keys (after ``seq_add`` the cache holds K rotated to the new position).
Recurrent layers always see the whole history in order, as recurrent state does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pymem.errors import ConfigError
from pymem.runtime.config import TinyConfig
from pymem.runtime.weights import LayerWeights, TinyWeights
from pymem.spec import RopeType, masked_swa


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """``ggml_rms_norm`` then a weight multiply, over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softplus(x: np.ndarray) -> np.ndarray:
    """ggml's softplus: ``x`` above 20, else ``log1p(exp(x))``."""
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


def rope(
    x: np.ndarray, pos: np.ndarray, n_rot: int, mode: RopeType, freq_base: float
) -> np.ndarray:
    """Rotate ``x [..., n_dims]`` by positions ``pos`` (broadcast against ``x[..., 0]``).

    ggml ``rope_ext`` with freq_scale 1 and no YaRN: pair ``i`` turns by
    ``pos * freq_base**(-2i/n_rot)``. NORM pairs neighbours ``(2i, 2i+1)``; NEOX pairs
    ``(i, i + n_rot/2)``. Dims past ``n_rot`` pass through.
    """
    half = n_rot // 2
    theta = np.asarray(pos, dtype=np.float64)[..., None] * freq_base ** (
        -2.0 * np.arange(half) / n_rot
    )
    cos, sin = np.cos(theta), np.sin(theta)
    out = np.array(x, dtype=np.float64)
    if mode == RopeType.NORM:
        x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = x0 * cos - x1 * sin
        out[..., 1:n_rot:2] = x0 * sin + x1 * cos
    elif mode == RopeType.NEOX:
        x0, x1 = x[..., :half], x[..., half:n_rot]
        out[..., :half] = x0 * cos - x1 * sin
        out[..., half:n_rot] = x0 * sin + x1 * cos
    else:
        raise ConfigError(f"rope_type: the oracle supports NORM and NEOX, got {mode!r}")
    return out


class Oracle:
    """Logits of whole sequences from scratch, in float64."""

    def __init__(self, weights: TinyWeights) -> None:
        self.w = weights
        self.c: TinyConfig = weights.config
        # float64 copies once: the oracle's arithmetic is independent of the graph's f32
        self._f64 = {id(a): a.astype(np.float64) for a in self._arrays()}

    def _arrays(self) -> list[np.ndarray]:
        out = [self.w.tok_embd, self.w.output_norm, self.w.output]
        for lw in self.w.layers:
            out += [v for v in vars(lw).values() if isinstance(v, np.ndarray)]
        return out

    def _d(self, a: np.ndarray | None) -> np.ndarray:
        assert a is not None
        return self._f64[id(a)]

    def logits(
        self,
        tokens: Sequence[int] | np.ndarray,
        pos: Sequence[int] | np.ndarray | None = None,
        visible: np.ndarray | None = None,
        key_pos: np.ndarray | None = None,
    ) -> np.ndarray:
        """Logits ``[T, n_vocab]`` of every token of one sequence's history.

        ``pos`` defaults to ``0..T-1``. ``visible[i, j]`` (default ``j <= i``) says whether
        token ``i``'s attention saw token ``j``; ``key_pos[i, j]`` (default ``pos[j]``) is
        the position token ``j``'s key had when token ``i`` read it. Sliding-window layers
        further drop keys with ``is_masked_swa(key_pos[i, j], pos[i])``.
        """
        c = self.c
        tok = np.asarray(tokens, dtype=np.int64)
        n = tok.size
        p = np.arange(n, dtype=np.int64) if pos is None else np.asarray(pos, dtype=np.int64)
        if p.shape != (n,):
            raise ConfigError(f"pos: expected {n} positions, got shape {p.shape}")
        if tok.size and (tok.min() < 0 or tok.max() >= c.n_vocab):
            raise ConfigError(
                f"tokens: ids must be in [0, {c.n_vocab}), got {tok.min()}..{tok.max()}"
            )
        vis = (
            np.tril(np.ones((n, n), dtype=bool))
            if visible is None
            else np.asarray(visible, dtype=bool)
        )
        kpos = (
            np.broadcast_to(p[None, :], (n, n))
            if key_pos is None
            else np.asarray(key_pos, dtype=np.int64)
        )

        x = self._d(self.w.tok_embd)[tok]
        for lw in self.w.layers:
            h = rms_norm(x, self._d(lw.attn_norm), c.norm_eps)
            if lw.kind == "R":
                x = x + self._mamba2(lw, h)
            else:
                allowed = vis
                if lw.kind == "S":
                    allowed = vis & ~masked_swa(c.n_swa, c.swa_type, kpos, p[:, None])
                x = x + self._attention(lw, h, p, allowed, kpos)
            h = rms_norm(x, self._d(lw.ffn_norm), c.norm_eps)
            gate = h @ self._d(lw.ffn_gate).T
            up = h @ self._d(lw.ffn_up).T
            x = x + (silu(gate) * up) @ self._d(lw.ffn_down).T
        x = rms_norm(x, self._d(self.w.output_norm), c.norm_eps)
        return x @ self._d(self.w.output).T

    def _attention(
        self,
        lw: LayerWeights,
        h: np.ndarray,
        pos: np.ndarray,
        allowed: np.ndarray,
        kpos: np.ndarray,
    ) -> np.ndarray:
        c = self.c
        n, hd = h.shape[0], c.head_dim
        q = (h @ self._d(lw.wq).T).reshape(n, c.n_head, hd)
        k = (h @ self._d(lw.wk).T).reshape(n, c.n_head_kv, hd)
        v = (h @ self._d(lw.wv).T).reshape(n, c.n_head_kv, hd)
        q = rope(q, pos[:, None], hd, c.rope_type, c.freq_base)
        group = c.n_head // c.n_head_kv  # query head h reads KV head h // group
        out = np.zeros((n, c.n_head, hd))
        for i in range(n):
            keys = np.flatnonzero(allowed[i])
            if keys.size == 0:
                continue  # not reached through a memory: a token always sees itself
            # the key of token j as token i saw it: rotated to key_pos[i, j]
            # [m, n_head_kv, hd]
            ki = rope(k[keys], kpos[i, keys][:, None], hd, c.rope_type, c.freq_base)
            ki = np.repeat(ki, group, axis=1)  # [m, n_head, hd]
            vi = np.repeat(v[keys], group, axis=1)
            scores = np.einsum("hd,mhd->hm", q[i], ki) / np.sqrt(hd)
            scores -= scores.max(axis=1, keepdims=True)
            prob = np.exp(scores)
            prob /= prob.sum(axis=1, keepdims=True)
            out[i] = np.einsum("hm,mhd->hd", prob, vi)
        return out.reshape(n, c.n_head * hd) @ self._d(lw.wo).T

    def _mamba2(self, lw: LayerWeights, h: np.ndarray) -> np.ndarray:
        """Mamba-2 over the whole history: causal conv, then the selective scan, token by token."""
        c = self.c
        n = h.shape[0]
        nh, hd, ds, ng = c.ssm_n_head, c.ssm_head_dim, c.d_state, c.n_group
        zxbcdt = h @ self._d(lw.ssm_in).T
        z = zxbcdt[:, : c.d_inner]
        xbc = zxbcdt[:, c.d_inner : c.d_inner + c.conv_channels]
        dt = zxbcdt[:, c.d_inner + c.conv_channels :]

        # causal conv over [d_conv - 1 zero columns (a fresh conv state), inputs...]
        w = self._d(lw.ssm_conv1d)  # [channels, d_conv]
        padded = np.concatenate([np.zeros((c.d_conv - 1, c.conv_channels)), xbc], axis=0)
        conv = np.zeros_like(xbc)
        for t in range(n):
            conv[t] = np.einsum("kc,ck->c", padded[t : t + c.d_conv], w)
        xbc = silu(conv + self._d(lw.ssm_conv1d_b))

        x = xbc[:, : c.d_inner].reshape(n, nh, hd)
        b = xbc[:, c.d_inner : c.d_inner + ng * ds].reshape(n, ng, ds)
        cc = xbc[:, c.d_inner + ng * ds :].reshape(n, ng, ds)
        dt = softplus(dt + self._d(lw.ssm_dt_b))  # [n, nh]
        a = self._d(lw.ssm_a)
        group = np.arange(nh) // (nh // ng)  # head -> its B/C group

        state = np.zeros((nh, hd, ds))  # a fresh SSM state
        y = np.zeros((n, nh, hd))
        for t in range(n):
            decay = np.exp(dt[t] * a)  # [nh]
            state = (
                state * decay[:, None, None]
                + (x[t] * dt[t][:, None])[:, :, None] * b[t, group][:, None, :]
            )
            y[t] = np.einsum("hds,hs->hd", state, cc[t, group])
        y = y + x * self._d(lw.ssm_d)[None, :, None]
        y = y.reshape(n, c.d_inner) * silu(z)
        y = rms_norm(
            y.reshape(n, ng, c.d_inner // ng), self._d(lw.ssm_norm).reshape(ng, -1), c.norm_eps
        )
        return y.reshape(n, c.d_inner) @ self._d(lw.ssm_out).T
