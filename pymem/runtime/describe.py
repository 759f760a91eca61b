"""Memories and plans described in the shape of a recorded llama.cpp run's ``memory`` section.

The recorder (tests/record/) writes what the reference built for a model and context as a
JSON ``memory`` section; these two functions put pymem's plan (:func:`describe_plan`) and a
built memory (:func:`describe_memory`) in the same shape, so a test or a benchmark
compares them with ``==``. They are tooling, not memory code: nothing below the runtime
layer uses them.
"""

from __future__ import annotations

from typing import Any

from pymem.factory import KVPartPlan, MemoryPlan, memory_type
from pymem.hybrid import HybridMemory
from pymem.kv import KVCache, KVCacheISWA
from pymem.memory import Memory
from pymem.types import ggml_type


def describe_plan(plan: MemoryPlan) -> dict[str, Any]:
    """The plan in the shape of a recorded run's ``memory`` section (for comparison).

    Row bytes come from the bound ggml's type table.
    """
    spec, ctx = plan.spec, plan.ctx
    has_kv = any(isinstance(p, KVPartPlan) for p in plan.parts)
    parts: list[dict[str, Any]] = []
    for p in plan.parts:
        if isinstance(p, KVPartPlan):
            tk, tv = ggml_type(p.type_k), ggml_type(p.type_v)
            parts.append(
                {
                    "kind": "kv",
                    "name": p.name,
                    "kv_size": p.kv_size,
                    "n_pad": p.n_pad,
                    "n_stream": p.n_stream,
                    "n_seq_max": p.n_seq_max,
                    "n_swa": p.n_swa,
                    "swa_type": p.swa_type.name.lower(),
                    "v_trans": p.v_trans,
                    "has_cell_ext": spec.n_pos_per_embd > 1,
                    "k_type": tk.name,
                    "v_type": tv.name,
                    "layers": [
                        {
                            "il": il,
                            "n_embd_k_gqa": spec.n_embd_k_gqa(il),
                            "n_embd_v_gqa": spec.n_embd_v_gqa(il),
                            "has_v": not spec.is_mla,
                            "k_row_bytes": tk.row_size(spec.n_embd_k_gqa(il)),
                            "v_row_bytes": 0 if spec.is_mla else tv.row_size(spec.n_embd_v_gqa(il)),
                        }
                        for il in p.layers
                    ],
                }
            )
        else:
            tr, ts = ggml_type(p.type_r), ggml_type(p.type_s)
            n_r, n_s = spec.n_embd_r(), spec.n_embd_s()
            parts.append(
                {
                    "kind": "recurrent",
                    "name": p.name,
                    "mem_size": p.mem_size,
                    "n_seq_max": p.n_seq_max,
                    "n_layer_total": spec.n_layer - spec.n_layer_nextn,
                    "n_rs_seq": p.n_rs_seq,
                    "s_trans": False,
                    "r_type": tr.name,
                    "s_type": ts.name,
                    "layers": [
                        {
                            "il": il,
                            "n_embd_r": n_r,
                            "n_embd_s": n_s,
                            "r_row_bytes": tr.row_size(n_r),
                            "s_row_bytes": ts.row_size(n_s),
                            "has_ple": False,
                        }
                        for il in p.layers
                    ],
                }
            )
    return {
        "type": plan.type,
        "arch": spec.arch,
        "n_seq_max": ctx.n_seq_max,
        "kv_unified": ctx.kv_unified,
        "n_stream": ctx.n_stream if has_kv else None,
        "flash_attn": ctx.flash_attn,
        "v_trans": ctx.v_trans if has_kv else None,
        "swa_full": ctx.swa_full,
        "n_ctx": ctx.n_ctx,
        "n_ctx_seq": ctx.n_ctx_seq,
        "n_batch": ctx.n_batch,
        "n_ubatch": ctx.n_ubatch,
        "n_swa": spec.n_swa,
        "swa_type": spec.swa_type.name.lower(),
        "type_k": ctx.type_k,
        "type_v": ctx.type_v,
        "layers": [
            {
                "il": il,
                "recurrent": lay.recurrent,
                "swa": lay.swa,
                "n_embd_k_gqa": lay.n_embd_k_gqa,
                "n_embd_v_gqa": lay.n_embd_v_gqa,
                "n_embd_r": lay.n_embd_r if lay.recurrent else 0,
                "n_embd_s": lay.n_embd_s if lay.recurrent else 0,
            }
            # the trunk, as llama_model_n_layer counts (NextN / MTP layers left out)
            for il, lay in enumerate(spec.layers[: spec.n_layer - spec.n_layer_nextn])
        ],
        "parts": parts,
        "can_shift": plan.can_shift,
    }


def describe_memory(mem: Memory) -> dict[str, Any]:
    """What a built memory actually holds, in the shape of :func:`describe_plan`'s
    ``type`` / ``parts`` / ``can_shift`` (sizes and row bytes read from the live objects)."""
    kind = memory_type(mem)
    named: list[tuple[str, Any]]
    if isinstance(mem, HybridMemory):
        attn = mem.mem_attn
        if isinstance(attn, KVCacheISWA):
            named = [("attn_base", attn.kv_base), ("attn_swa", attn.kv_swa)]
        else:
            named = [("attn", attn)]
        named.append(("recr", mem.mem_recr))
    elif isinstance(mem, KVCacheISWA):
        named = [("base", mem.kv_base), ("swa", mem.kv_swa)]
    elif isinstance(mem, KVCache):
        named = [("kv", mem)]
    else:
        named = [("recr", mem)]

    parts: list[dict[str, Any]] = []
    for name, part in named:
        if isinstance(part, KVCache):
            parts.append(
                {
                    "kind": "kv",
                    "name": name,
                    "kv_size": part.get_size(),
                    "n_pad": part.n_pad,
                    "n_stream": part.get_n_stream(),
                    "n_seq_max": part.n_seq_max,
                    "n_swa": part.n_swa,
                    "swa_type": part.swa_type.name.lower(),
                    "v_trans": part.v_trans,
                    "has_cell_ext": part.has_cell_ext(),
                    "k_type": part.type_k.name,
                    "v_type": part.type_v.name,
                    "layers": [
                        {
                            "il": lay.il,
                            "n_embd_k_gqa": lay.n_embd_k_gqa,
                            "n_embd_v_gqa": lay.n_embd_v_gqa,
                            "has_v": lay.v is not None,
                            "k_row_bytes": lay.k.row_size,
                            "v_row_bytes": 0
                            if lay.v is None
                            else part.type_v.row_size(lay.n_embd_v_gqa),
                        }
                        for lay in part.layers
                    ],
                }
            )
        else:
            parts.append(
                {
                    "kind": "recurrent",
                    "name": name,
                    "mem_size": part.size,
                    "n_seq_max": part.n_seq_max,
                    "n_layer_total": part.n_layer_trunk,
                    "n_rs_seq": part.n_rs_seq,
                    "s_trans": False,
                    "r_type": part.type_r.name,
                    "s_type": part.type_s.name,
                    "layers": [
                        {
                            "il": il,
                            "n_embd_r": part.n_embd_r,
                            "n_embd_s": part.n_embd_s,
                            "r_row_bytes": part.get_r_l(il).row_size,
                            "s_row_bytes": part.get_s_l(il).row_size,
                            "has_ple": False,
                        }
                        for il in part.layers
                    ],
                }
            )
    return {"type": kind, "parts": parts, "can_shift": mem.get_can_shift()}
