"""Random weights of the tiny hybrid decoder, drawn from a seed (nothing is downloaded).

Matrices are numpy ``float32 [out, in]``: the same bytes as a ggml tensor of shape
``(in, out)``, so the graph and the oracle read one set of arrays. Scales keep every
activation of order one (``1/sqrt(fan_in)`` projections, norms near 1, decays in (0, 1))
so that logits are O(1) and an absolute tolerance means the same thing at every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pymem.runtime.config import TinyConfig


@dataclass(frozen=True)
class LayerWeights:
    kind: str  # "A", "S" or "R"
    attn_norm: np.ndarray  # [n_embd]
    ffn_norm: np.ndarray  # [n_embd]
    ffn_gate: np.ndarray  # [n_ff, n_embd]
    ffn_up: np.ndarray  # [n_ff, n_embd]
    ffn_down: np.ndarray  # [n_embd, n_ff]
    # attention (A, S)
    wq: np.ndarray | None = None  # [n_head*head_dim, n_embd]
    wk: np.ndarray | None = None  # [n_head_kv*head_dim, n_embd]
    wv: np.ndarray | None = None  # [n_head_kv*head_dim, n_embd]
    wo: np.ndarray | None = None  # [n_embd, n_head*head_dim]
    # Mamba-2 (R), llama.cpp tensor names ssm_*
    ssm_in: np.ndarray | None = None  # [d_in_proj, n_embd]: z | xBC | dt
    ssm_conv1d: np.ndarray | None = None  # [conv_channels, d_conv]
    ssm_conv1d_b: np.ndarray | None = None  # [conv_channels]
    ssm_dt_b: np.ndarray | None = None  # [ssm_n_head]
    ssm_a: np.ndarray | None = None  # [ssm_n_head], negative: -exp(A_log)
    ssm_d: np.ndarray | None = None  # [ssm_n_head]
    ssm_norm: np.ndarray | None = None  # [d_inner], grouped RMS norm weight
    ssm_out: np.ndarray | None = None  # [n_embd, d_inner]


@dataclass(frozen=True)
class TinyWeights:
    config: TinyConfig
    tok_embd: np.ndarray  # [n_vocab, n_embd]
    layers: tuple[LayerWeights, ...]
    output_norm: np.ndarray  # [n_embd]
    output: np.ndarray  # [n_vocab, n_embd]

    @classmethod
    def random(cls, config: TinyConfig) -> TinyWeights:
        """Weights drawn from ``numpy.random.default_rng(config.seed)``; same seed, same bytes."""
        rng = np.random.default_rng(config.seed)
        c = config

        def mat(n_out: int, n_in: int) -> np.ndarray:
            return (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)

        def norm(n: int) -> np.ndarray:
            return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

        layers = []
        for kind in c.layers:
            common = dict(
                kind=kind,
                attn_norm=norm(c.n_embd),
                ffn_norm=norm(c.n_embd),
                ffn_gate=mat(c.n_ff, c.n_embd),
                ffn_up=mat(c.n_ff, c.n_embd),
                ffn_down=mat(c.n_embd, c.n_ff),
            )
            if kind == "R":
                layers.append(
                    LayerWeights(
                        **common,  # type: ignore[arg-type]
                        ssm_in=mat(c.d_in_proj, c.n_embd),
                        ssm_conv1d=(
                            rng.standard_normal((c.conv_channels, c.d_conv)) / np.sqrt(c.d_conv)
                        ).astype(np.float32),
                        ssm_conv1d_b=(0.1 * rng.standard_normal(c.conv_channels)).astype(
                            np.float32
                        ),
                        # dt bias around softplus^-1 of 0.1..0.5: a decay that keeps real memory of the past
                        ssm_dt_b=rng.uniform(-2.0, 0.0, c.ssm_n_head).astype(np.float32),
                        ssm_a=(-np.exp(rng.uniform(-1.0, 1.0, c.ssm_n_head))).astype(np.float32),
                        ssm_d=rng.uniform(0.5, 1.5, c.ssm_n_head).astype(np.float32),
                        ssm_norm=norm(c.d_inner),
                        ssm_out=mat(c.n_embd, c.d_inner),
                    )
                )
            else:
                layers.append(
                    LayerWeights(
                        **common,  # type: ignore[arg-type]
                        wq=mat(c.n_head * c.head_dim, c.n_embd),
                        wk=mat(c.n_head_kv * c.head_dim, c.n_embd),
                        wv=mat(c.n_head_kv * c.head_dim, c.n_embd),
                        wo=mat(c.n_embd, c.n_head * c.head_dim),
                    )
                )
        return cls(
            config=c,
            tok_embd=rng.standard_normal((c.n_vocab, c.n_embd)).astype(np.float32),
            layers=tuple(layers),
            output_norm=norm(c.n_embd),
            output=mat(c.n_vocab, c.n_embd),
        )

    def nbytes(self) -> int:
        total = self.tok_embd.nbytes + self.output_norm.nbytes + self.output.nbytes
        for lw in self.layers:
            total += sum(v.nbytes for v in vars(lw).values() if isinstance(v, np.ndarray))
        return total
