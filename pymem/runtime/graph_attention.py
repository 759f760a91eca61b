"""Attention-only architectures beyond llama and Gemma-2: Gemma-3 and the sliding-window families.

A mixin of the engine's graph builder (``pymem.runtime.gguf_llama._Graph``): methods
here use its context (``self.ctx``), hyper-parameters (``self.hp``), weights
(``self.m._w``), inputs and shared blocks (``norm``, ``ffn``, ``attention``,
``gemma_layers``, ...). :data:`ARCH_GRAPHS` registers the architectures built here.
"""

from __future__ import annotations

from typing import Any

from pymem.runtime.arch_graph import ArchGraph, f32_div


class AttentionGraph:
    """Graph builders of this family (mixed into the engine's graph builder)."""

    def gemma3(self, inp: Any, out_ids: Any) -> Any:
        """``llama_model_gemma3::graph`` up to the output norm (text tokens only).

        As Gemma-2 with Q/K RMS norms and no KQ soft-capping; SWA layers take the SWA
        RoPE base (the spec's per-layer RopeSpec) and read the iSWA cache's SWA half.
        """
        return self.gemma_layers(inp, out_ids, qk_norm=True)  # type: ignore[attr-defined]


def _gemma3_logits(g: Any, cur: Any) -> Any:
    """Final logit soft-capping, only when the file sets ``final_logit_softcapping``."""
    field = g.m.keys.fields.get(f"{g.hp.arch}.final_logit_softcapping")
    cap = float(field.contents()) if field is not None else 0.0
    if cap == 0.0:
        return cur
    cur = g.ctx.scale(cur, f32_div(1.0, cap))
    return g.ctx.scale(g.ctx.tanh(cur), cap)


ARCH_GRAPHS: dict[str, ArchGraph] = {
    "gemma3": ArchGraph(AttentionGraph.gemma3, finish=_gemma3_logits),
}
