"""Linear-attention hybrids: gated delta-net (Qwen3-Next, Qwen3.5), KDA (Kimi-Linear),
lightning attention (MiniMax-01) and their relatives.

Their recurrent layers keep a conv state (R) and a per-head square state matrix (S).
"""

from __future__ import annotations

from pymem.gguf_spec.draft import ArchRule

RULES: dict[str, ArchRule] = {}
