"""Every architecture pymem reads, and the reference's classification of them.

Why: one table that says, per ``general.architecture``, how the reference loads it
(:class:`~pymem.gguf_spec.draft.ArchRule`), merged from the family modules
(``arch_attention``: dense and sliding-window attention; ``arch_ssm``: Mamba and its
hybrids; ``arch_linear``: gated delta-net, KDA and linear-attention hybrids;
``arch_other``: short-conv and RWKV). A name in two modules is a bug, refused at import.
"""

from __future__ import annotations

from pymem.gguf_spec import arch_attention, arch_linear, arch_other, arch_ssm
from pymem.gguf_spec.draft import ArchRule

# llm_arch_is_recurrent / llm_arch_is_hybrid (llama-arch.cpp)
RECURRENT_ARCHS = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})
HYBRID_ARCHS = frozenset(
    {
        "jamba", "falcon-h1", "plamo2", "granitehybrid", "lfm2", "lfm2moe", "nemotron_h",
        "nemotron_h_moe", "qwen3next", "kimi-linear", "bailingmoe3", "kimi-k3", "glm5-next",
        "qwen35", "qwen35moe", "qwen4exp", "deepseek4", "minimax-01",
    }
)  # fmt: skip
NO_KV_SHIFT_ARCHS = frozenset({"step35"})
"""Architectures whose K the reference refuses to shift (``get_can_shift`` false)."""


def _merge(*tables: dict[str, ArchRule]) -> dict[str, ArchRule]:
    out: dict[str, ArchRule] = {}
    for table in tables:
        for name, rule in table.items():
            if name in out:
                raise RuntimeError(f"architecture {name!r} has two rules")
            out[name] = rule
    return out


RULES: dict[str, ArchRule] = _merge(
    arch_attention.RULES, arch_ssm.RULES, arch_linear.RULES, arch_other.RULES
)
SLIDING_WINDOW_ARCHS = arch_attention.SLIDING_WINDOW_ARCHS
if SLIDING_WINDOW_ARCHS - RULES.keys():
    raise RuntimeError(
        f"sliding-window archs without a rule: {SLIDING_WINDOW_ARCHS - RULES.keys()}"
    )
SUPPORTED_ARCHS = frozenset(name for name, rule in RULES.items() if not rule.unsupported)
