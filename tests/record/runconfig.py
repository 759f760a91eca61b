"""One recording's settings (model file, scenario variant, context parameters).

Shared by record_llama_cpp.py and the per-family run lists (``family_*.py``), which each
add their models' writers (``MODEL_WRITERS``) and runs (``RUNS``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

N_SEQ = 4


class Play(enum.Enum):
    """The scenario a recording plays, unless its label names a family's own
    (``SCENARIOS`` of a family module)."""

    MAIN = "main"  # scenario(): the shared runs' scenario, with kshift / n_rs_seq variants
    FILL = "fill"  # fill_scenario(): the cells run out
    OPS = "ops"  # ops_scenario(): unusual op arguments
    CHECKPOINT = "checkpoint"  # checkpoint_scenario(): PARTIAL_ONLY states


@dataclass(frozen=True)
class RunConfig:
    """One recording: model file, scenario variant and context parameters.

    ``scenario`` is the run's label (``main`` = the shared runs' scenario, plus suffixes
    naming what differs); what is played is decided by ``kshift`` (False: no decode while a
    K-shift is pending, since the reference aborts on it for an iSWA base cache without
    layers and segfaults for a q8_0 K cache on CPU) and ``n_rs_seq`` (> 0: recurrent
    rollbacks are added), see :func:`scenario`.
    """

    name: str
    model: str
    model_file: str
    scenario: str
    n_ctx: int
    n_ubatch: int
    flash_attn: bool
    kv_unified: bool
    n_batch: int = 256
    type_k: str = "f16"
    type_v: str = "f16"
    n_rs_seq: int = 0
    swa_full: bool = False
    kshift: bool = True
    play: Play = Play.MAIN  # which scenario is played (a family's own, named by the label, wins)
    # False: no seq_add / seq_div (step35: the reference takes them and aborts at the next
    # decode, since get_can_shift is false; pymem refuses them up front)
    seq_shift: bool = True

    @classmethod
    def of(
        cls,
        model: str,
        model_file: str,
        scenario: str,
        n_ctx: int,
        n_ubatch: int,
        flash_attn: bool,
        kv_unified: bool,
        **kw: Any,
    ) -> RunConfig:
        """A run named by the usual pattern ``{model}.{scenario}.fa{0|1}.u{0|1}``.

        E.g. ``of("gemma2", "tiny-gemma2.gguf", "main", 512, 64, True, True)`` is
        ``gemma2.main.fa1.u1``; runs named otherwise (recurrent-only ``.u1``, ``-mtp``
        files) spell the name out with the constructor.
        """
        name = f"{model}.{scenario}.fa{int(flash_attn)}.u{int(kv_unified)}"
        return cls(name, model, model_file, scenario, n_ctx, n_ubatch, flash_attn, kv_unified, **kw)

    def context_params(self) -> dict[str, Any]:
        return {
            "n_ctx": self.n_ctx,
            "n_seq_max": N_SEQ,
            "n_batch": self.n_batch,
            "n_ubatch": self.n_ubatch,
            "flash_attn": self.flash_attn,
            "kv_unified": self.kv_unified,
            "swa_full": self.swa_full,
            "type_k": self.type_k,
            "type_v": self.type_v,
            "n_rs_seq": self.n_rs_seq,
        }
