"""Build the memory a model needs, as llama.cpp's ``llama_model::create_memory`` does.

Why: which memory class a model gets (KV cache, iSWA, recurrent, hybrid, hybrid-iSWA),
which layers each part holds, and how many cells each part has are decided in two places
in the reference: the context constructor (``n_ctx`` rounded up to 256, cells per stream,
``n_ubatch``, flash attention -> ``v_trans``) and ``create_memory`` (class and layer
filters per architecture, the SWA cache size). A runtime that picks a class by hand will
sooner or later get one of those rules wrong, and then its state blobs no longer match
the reference byte for byte. So:

* :class:`ContextParams` is what a runtime passes (``llama_context_params``' memory
  fields, with the reference defaults).
* :func:`resolve_context` applies the context-level sizing rules -> :class:`ContextSizes`.
* :func:`plan_memory` decides the memory type and every part's layers and sizes ->
  :class:`MemoryPlan` (pure data, no allocation; compare it with a recorded run).
* :func:`create_memory` builds the planned memory.

Context rules (``llama_context::llama_context``), in order::

    n_seq_max = max(1, n_seq_max)                      (<= 256)
    n_ctx     = n_ctx or model's n_ctx_train
    n_batch   = min(n_ctx, n_batch)   if causal attention
    n_ubatch  = min(n_batch, n_ubatch or n_batch)
    n_ctx     = PAD(n_ctx, 256)
    n_ctx_seq = n_ctx                                  if kv_unified
              = PAD(n_ctx / n_seq_max, 256)            else, and n_ctx = n_ctx_seq * n_seq_max
    v_trans   = not flash_attn                         ("auto" counts as on: the memory is
                                                        created before auto is resolved)
    n_rs_seq  = 0 unless the architecture supports recurrent rollback

Memory rules (``create_memory``)::

    recurrent arch          -> RecurrentMemory(mem_size = max(1, n_seq_max))
    hybrid arch, SWA        -> HybridISWAMemory(KVCacheISWA + RecurrentMemory)
    hybrid arch             -> HybridMemory(KVCache + RecurrentMemory)
    attention, SWA          -> KVCacheISWA(base: full layers, swa: SWA layers)
    attention               -> KVCache
    SWA cache cells         = kv_size if swa_full
                            = PAD(min(kv_size, n_swa * (n_seq_max if unified else 1) + n_ubatch), 256)
    attention cells/stream  = n_ctx_seq, streams = 1 if kv_unified else n_seq_max, n_pad = 1

Hybrid layer filters: recurrent layers -> recurrent part, the others -> attention, except
Falcon-H1 (every layer in both), Nemotron-H (only layers with ``n_ff == 0``) and the
Qwen3-Next family / MiniMax-01 (trunk layers only, no NextN layers). A plain KV model with
NextN layers keeps only its trunk layers. The architecture classification comes from
``spec.is_recurrent_arch`` / ``spec.is_hybrid_arch`` (set by
:func:`pymem.gguf_spec.spec_from_gguf`); a hand-built spec without them is classified by
its layers (all recurrent -> recurrent, a mix -> hybrid, none -> attention).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pymem.errors import ConfigError
from pymem.hybrid import HybridISWAMemory, HybridMemory
from pymem.kv import KVCache, KVCacheISWA, swa_cache_size
from pymem.memory import Memory
from pymem.recurrent import RecurrentMemory
from pymem.spec import ModelSpec, SWAType
from pymem.types import ggml_type
from pymem.ubatch import LLAMA_MAX_SEQ

LayerFilter = Callable[[int], bool]

CTX_PAD = 256
"""The reference pads ``n_ctx`` (and per-stream ``n_ctx_seq``) to a multiple of 256."""

# archs whose create_memory returns no memory at all (encoders, diffusion models)
NO_MEMORY_ARCHS = frozenset(
    {
        "bert", "jina-bert-v2", "jina-bert-v3", "nomic-bert", "nomic-bert-moe", "neo-bert",
        "eurobert", "wavtokenizer-dec", "modern-bert", "gemma-embedding", "dream", "llada",
        "llada-moe", "rnd1",
    }
)  # fmt: skip

# llm_arch_supports_rs_rollback
RS_ROLLBACK_ARCHS = frozenset(
    {
        "kimi-k3", "qwen35", "qwen35moe", "qwen4exp", "deepseek4", "glm5-next", "nemotron_h",
        "nemotron_h_moe", "lfm2", "lfm2moe", "bailingmoe3",
    }
)  # fmt: skip

_TRUNK_ONLY_HYBRIDS = frozenset({"qwen3next", "qwen35", "qwen35moe", "qwen4exp", "minimax-01"})
_NEMOTRON_H = frozenset({"nemotron_h", "nemotron_h_moe"})


def pad(n: int, multiple: int) -> int:
    """``GGML_PAD``: ``n`` rounded up to a multiple. E.g. pad(300, 256) -> 512, pad(0, 256) -> 0."""
    return (n + multiple - 1) // multiple * multiple


def _flash_attn_on(value: bool | str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("auto", "enabled", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("disabled", "off"):
        return False
    raise ConfigError(
        f"flash_attn: expected a bool or 'auto' / 'enabled' / 'disabled', got {value!r}"
    )


@dataclass(frozen=True)
class ContextParams:
    """The memory-related fields of ``llama_context_params``, with the reference defaults.

    ``n_ctx = 0`` means the model's training context (``spec.n_ctx_train``),
    ``n_ubatch = 0`` means ``n_batch``. ``flash_attn`` is a bool or ``"auto"`` (the
    reference default, which makes V untransposed: the memory is created before "auto"
    is resolved). ``swa_full`` defaults to True as in ``llama_context_default_params``.
    ``device``: a device name for every buffer (None = pymem's default device).
    """

    n_ctx: int = 512
    n_seq_max: int = 1
    n_ubatch: int = 512
    n_batch: int = 2048
    flash_attn: bool | str = "auto"
    kv_unified: bool = False
    swa_full: bool = True
    type_k: str = "f16"
    type_v: str = "f16"
    n_rs_seq: int = 0
    device: Any = None

    def __post_init__(self) -> None:
        for name in ("n_ctx", "n_seq_max", "n_ubatch", "n_batch", "n_rs_seq"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name}: must be an int >= 0, got {v!r}")
        if self.n_seq_max > LLAMA_MAX_SEQ:
            raise ConfigError(f"n_seq_max: must be <= {LLAMA_MAX_SEQ}, got {self.n_seq_max}")
        _flash_attn_on(self.flash_attn)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ContextParams:
        """From a run's ``context_params`` (unknown keys are ignored)."""
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class ContextSizes:
    """The context-level values the memory is built from (``llama_cparams``' subset)."""

    n_ctx: int
    n_ctx_seq: int
    n_seq_max: int
    n_batch: int
    n_ubatch: int
    flash_attn: bool
    v_trans: bool
    kv_unified: bool
    n_stream: int
    swa_full: bool
    type_k: str
    type_v: str
    n_rs_seq: int
    rs_size: int
    device: Any = None


def _check_cache_types(spec: ModelSpec, params: ContextParams) -> None:
    """``llama_init_from_model``'s cache type checks.

    A quantized V cache needs flash attention ("auto" turns it on, as the reference).
    A block-quantized K (V) type must divide every attention layer's head size: the
    reference refuses that with flash attention on, and with it off builds a cache whose
    per-head views are broken; pymem refuses both. E.g. q8_0 (block 32) with head size 16.
    """

    tk, tv = ggml_type(params.type_k), ggml_type(params.type_v)
    if tv.is_quantized and not _flash_attn_on(params.flash_attn):
        raise ConfigError(f"type_v: a quantized V cache ({tv.name}) requires flash_attn enabled")
    for t, what in ((tk, "k"), (tv, "v")):
        if t.block_size == 1:
            continue
        for il, lay in enumerate(spec.layers):
            head = lay.n_embd_head_k if what == "k" else lay.n_embd_head_v
            if lay.n_head_kv > 0 and head % t.block_size:
                raise ConfigError(
                    f"type_{what}: {what.upper()} cache type {t.name} with block size {t.block_size} "
                    f"does not divide n_embd_head_{what}={head} (layer {il})"
                )


def resolve_context(spec: ModelSpec, params: ContextParams) -> ContextSizes:
    """Apply the reference's context sizing rules (see the module docstring).

    E.g. n_ctx 1000, n_seq_max 4, not unified -> n_ctx_seq PAD(1024/4) = 256, n_ctx 1024;
    n_ctx 256, n_seq_max 4, not unified -> n_ctx_seq PAD(64) = 256, n_ctx 1024 (4 x 256).
    """
    n_seq_max = max(1, params.n_seq_max)
    n_rs_seq = params.n_rs_seq
    if n_rs_seq > 0 and spec.arch and spec.arch not in RS_ROLLBACK_ARCHS:
        n_rs_seq = 0  # the reference clamps silently (debug log only)

    n_ctx = params.n_ctx
    if n_ctx == 0:
        n_ctx = spec.n_ctx_train
        if n_ctx <= 0:
            raise ConfigError(
                "n_ctx: 0 means the model's training context, but spec.n_ctx_train is 0"
            )
    n_batch = min(n_ctx, params.n_batch) if spec.causal_attn else params.n_batch
    n_ubatch = min(n_batch, params.n_ubatch if params.n_ubatch else n_batch)
    if n_ubatch < 1:
        raise ConfigError(f"n_batch: must be >= 1, got {params.n_batch}")

    n_ctx = pad(n_ctx, CTX_PAD)
    if params.kv_unified:
        n_ctx_seq = n_ctx
    else:
        n_ctx_seq = pad(n_ctx // n_seq_max, CTX_PAD)
        if n_ctx_seq == 0:
            raise ConfigError(
                f"n_ctx: {n_ctx} cells over {n_seq_max} sequences gives n_ctx_seq == 0"
            )
        n_ctx = n_ctx_seq * n_seq_max

    flash = _flash_attn_on(params.flash_attn)
    _check_cache_types(spec, params)
    return ContextSizes(
        n_ctx=n_ctx,
        n_ctx_seq=n_ctx_seq,
        n_seq_max=n_seq_max,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        flash_attn=flash,
        v_trans=not flash,
        kv_unified=bool(params.kv_unified),
        n_stream=1 if params.kv_unified else n_seq_max,
        swa_full=bool(params.swa_full),
        type_k=str(params.type_k),
        type_v=str(params.type_v),
        n_rs_seq=n_rs_seq,
        rs_size=max(1, n_seq_max),
        device=params.device,
    )


# --------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVPartPlan:
    """One ``llama_kv_cache``: which model layers it holds and how it is sized."""

    name: str
    layers: tuple[int, ...]
    kv_size: int
    n_stream: int
    n_seq_max: int
    unified: bool
    n_swa: int
    swa_type: SWAType
    v_trans: bool
    type_k: str
    type_v: str
    n_pad: int = 1
    kind: str = "kv"


@dataclass(frozen=True)
class RecurrentPartPlan:
    """One ``llama_memory_recurrent``: layers, cells and rollback planes."""

    name: str
    layers: tuple[int, ...]
    mem_size: int
    n_seq_max: int
    n_rs_seq: int
    type_r: str = "f32"
    type_s: str = "f32"
    kind: str = "recurrent"


PartPlan = KVPartPlan | RecurrentPartPlan


@dataclass(frozen=True)
class MemoryPlan:
    """What :func:`create_memory` builds: the type and its parts in serialisation order.

    ``type`` is one of ``"kv_cache"``, ``"kv_cache_iswa"``, ``"recurrent"``, ``"hybrid"``,
    ``"hybrid_iswa"`` or ``"none"`` (architectures without memory).
    """

    type: str
    ctx: ContextSizes
    parts: tuple[PartPlan, ...]
    spec: ModelSpec = field(repr=False, compare=False)

    def part(self, name: str) -> PartPlan:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def can_shift(self) -> bool:
        """``get_can_shift()`` of the planned memory.

        KV: no M-RoPE. iSWA: both caches shiftable and of equal size (``swa_full``).
        Hybrids: the attention part's answer. Recurrent: always.
        """
        kv_ok = self.spec.n_pos_per_embd == 1 and self.spec.kv_shiftable
        kv_parts = [p for p in self.parts if isinstance(p, KVPartPlan)]
        if not kv_parts:
            return True
        if len(kv_parts) == 2:
            return kv_ok and kv_parts[0].kv_size == kv_parts[1].kv_size
        return kv_ok


def classify(spec: ModelSpec) -> str:
    """The reference's architecture class: ``"none"``, ``"recurrent"``, ``"hybrid"`` or ``"attention"``."""
    if spec.arch in NO_MEMORY_ARCHS:
        return "none"
    rec = spec.is_recurrent_arch
    hyb = spec.is_hybrid_arch
    if rec is None and hyb is None:
        n_rec = sum(1 for lay in spec.layers if lay.recurrent)
        if n_rec == spec.n_layer:
            return "recurrent"
        return "hybrid" if n_rec else "attention"
    if rec:
        return "recurrent"
    return "hybrid" if hyb else "attention"


def hybrid_filters(spec: ModelSpec) -> tuple[LayerFilter, LayerFilter]:
    """``(filter_attn, filter_recr)`` for a hybrid model, per architecture (see module doc)."""
    arch = spec.arch
    n_layer = spec.n_layer - spec.n_layer_nextn
    if arch == "falcon-h1":
        return (lambda il: True), (lambda il: True)
    if arch in _NEMOTRON_H:
        ff = spec.n_ff
        if not ff:
            raise ConfigError(f"spec.n_ff: the {arch} layer filters need per-layer n_ff, got ()")
        return (
            lambda il: not spec.layers[il].recurrent and ff[il] == 0,
            lambda il: spec.layers[il].recurrent and ff[il] == 0,
        )
    if arch in _TRUNK_ONLY_HYBRIDS:
        return (
            lambda il: il < n_layer and not spec.layers[il].recurrent,
            lambda il: il < n_layer and spec.layers[il].recurrent,
        )
    return (lambda il: not spec.layers[il].recurrent), (lambda il: spec.layers[il].recurrent)


def _kv_filter(spec: ModelSpec) -> LayerFilter | None:
    """A plain KV model with NextN layers keeps only its trunk (main context)."""
    nextn = spec.n_layer_nextn
    if nextn > 0 and spec.n_layer - nextn > 0:
        n_layer = spec.n_layer - nextn
        return lambda il: il < n_layer
    return None


def _kv_part(
    name: str, layers: tuple[int, ...], size: int, ctx: ContextSizes, n_swa: int, swa_type: SWAType
) -> KVPartPlan:
    return KVPartPlan(
        name=name,
        layers=layers,
        kv_size=size,
        n_stream=ctx.n_stream,
        n_seq_max=ctx.n_seq_max,
        unified=ctx.kv_unified,
        n_swa=n_swa,
        swa_type=swa_type,
        v_trans=ctx.v_trans,
        type_k=ctx.type_k,
        type_v=ctx.type_v,
    )


def _iswa_parts(
    spec: ModelSpec, ctx: ContextSizes, filt: LayerFilter | None, prefix: str
) -> tuple[KVPartPlan, KVPartPlan]:
    """Base (full-attention layers, no SWA) and SWA parts of an iSWA cache."""
    ils = [il for il in range(spec.n_layer) if filt is None or filt(il)]
    base = tuple(il for il in ils if not spec.layers[il].swa)
    swa = tuple(il for il in ils if spec.layers[il].swa)
    size_swa = swa_cache_size(
        ctx.n_ctx_seq, spec.n_swa, ctx.kv_unified, ctx.n_seq_max, ctx.n_ubatch, ctx.swa_full
    )
    return (
        _kv_part(f"{prefix}base", base, ctx.n_ctx_seq, ctx, 0, SWAType.NONE),
        _kv_part(f"{prefix}swa", swa, size_swa, ctx, spec.n_swa, spec.swa_type),
    )


def plan_memory(spec: ModelSpec, params: ContextParams | ContextSizes) -> MemoryPlan:
    """Decide the memory type and every part's layers and sizes, allocating nothing."""
    ctx = params if isinstance(params, ContextSizes) else resolve_context(spec, params)
    # RoPE long / short factors are a context's choice (llama_model::get_rope_factors)
    spec = spec.for_context(ctx.n_ctx_seq)
    kind = classify(spec)
    has_swa = spec.swa_type != SWAType.NONE

    if kind == "none":
        return MemoryPlan("none", ctx, (), spec)

    if kind == "recurrent":
        rec = RecurrentPartPlan(
            "recr", tuple(range(spec.n_layer)), ctx.rs_size, ctx.n_seq_max, ctx.n_rs_seq
        )
        return MemoryPlan("recurrent", ctx, (rec,), spec)

    if kind == "hybrid":
        f_attn, f_recr = hybrid_filters(spec)
        rec = RecurrentPartPlan(
            "recr",
            tuple(il for il in range(spec.n_layer) if f_recr(il)),
            ctx.rs_size,
            ctx.n_seq_max,
            ctx.n_rs_seq,
        )
        if has_swa:
            base, swa = _iswa_parts(spec, ctx, f_attn, "attn_")
            return MemoryPlan("hybrid_iswa", ctx, (base, swa, rec), spec)
        attn_layers = tuple(il for il in range(spec.n_layer) if f_attn(il))
        attn = _kv_part("attn", attn_layers, ctx.n_ctx_seq, ctx, spec.n_swa, spec.swa_type)
        return MemoryPlan("hybrid", ctx, (attn, rec), spec)

    filt = _kv_filter(spec)
    if has_swa:
        if not spec.has_swa_layers():
            raise ConfigError(
                f"spec: swa_type is {spec.swa_type.name} but no attention layer is SWA"
            )
        base, swa = _iswa_parts(spec, ctx, filt, "")
        return MemoryPlan("kv_cache_iswa", ctx, (base, swa), spec)
    if spec.has_swa_layers():
        raise ConfigError("spec: some layers are SWA but swa_type is NONE")
    layers = tuple(il for il in range(spec.n_layer) if filt is None or filt(il))
    return MemoryPlan(
        "kv_cache",
        ctx,
        (_kv_part("kv", layers, ctx.n_ctx_seq, ctx, spec.n_swa, spec.swa_type),),
        spec,
    )


# --------------------------------------------------------------------------------------
# construction
# --------------------------------------------------------------------------------------


def _part_kw(layers: tuple[int, ...], device: Any) -> dict[str, Any]:
    """The constructor arguments every planned part shares: its layers, and the device."""
    chosen = frozenset(layers)
    kw: dict[str, Any] = {"filter": lambda il: il in chosen}
    if device is not None:
        kw["device"] = device
    return kw


def build_kv(spec: ModelSpec, part: KVPartPlan, device: Any = None) -> Any:
    """A :class:`pymem.kv.KVCache` for one planned part."""
    return KVCache(
        spec,
        type_k=part.type_k,
        type_v=part.type_v,
        v_trans=part.v_trans,
        unified=part.unified,
        kv_size=part.kv_size,
        n_seq_max=part.n_seq_max,
        n_pad=part.n_pad,
        n_swa=part.n_swa,
        swa_type=part.swa_type,
        **_part_kw(part.layers, device),
    )


def build_recurrent(spec: ModelSpec, part: RecurrentPartPlan, device: Any = None) -> Any:
    """A :class:`pymem.recurrent.RecurrentMemory` for one planned part."""
    return RecurrentMemory(
        spec,
        type_r=part.type_r,
        type_s=part.type_s,
        mem_size=part.mem_size,
        n_seq_max=part.n_seq_max,
        n_rs_seq=part.n_rs_seq,
        **_part_kw(part.layers, device),
    )


def build_from_plan(plan: MemoryPlan) -> Memory | None:
    """Allocate the memory a :class:`MemoryPlan` describes (None for type ``"none"``).

    The parts are built in plan order and composed by type; if any of that fails, the
    parts built so far are closed before the error propagates.
    """
    compose: dict[str, Callable[[list[Any]], Memory]] = {
        "kv_cache": lambda p: p[0],
        "recurrent": lambda p: p[0],
        "kv_cache_iswa": lambda p: KVCacheISWA.from_parts(p[0], p[1]),
        "hybrid": lambda p: HybridMemory(p[0], p[1]),
        "hybrid_iswa": lambda p: HybridISWAMemory(KVCacheISWA.from_parts(p[0], p[1]), p[2]),
    }
    if plan.type == "none":
        return None
    if plan.type not in compose:
        raise ConfigError(f"plan.type: unknown memory type {plan.type!r}")
    spec, dev = plan.spec, plan.ctx.device
    built: list[Any] = []
    try:
        for part in plan.parts:
            if isinstance(part, KVPartPlan):
                built.append(build_kv(spec, part, dev))
            else:
                built.append(build_recurrent(spec, part, dev))
        return compose[plan.type](built)
    except Exception:
        for mem in built:
            mem.close()
        raise


def memory_type(mem: Memory | None) -> str:
    """The reference type name of a built memory (as :attr:`MemoryPlan.type`)."""
    if mem is None:
        return "none"
    if isinstance(mem, HybridMemory):
        return "hybrid_iswa" if mem.is_iswa else "hybrid"
    if isinstance(mem, KVCacheISWA):
        return "kv_cache_iswa"
    if isinstance(mem, KVCache):
        return "kv_cache"
    if isinstance(mem, RecurrentMemory):
        return "recurrent"
    raise ConfigError(f"mem: not a pymem memory type: {type(mem).__name__}")


def create_memory(spec: ModelSpec, params: ContextParams | None = None) -> Memory | None:
    """The memory llama.cpp builds for this model and these context parameters.

    Returns a :class:`~pymem.kv.KVCache`, :class:`~pymem.kv.iswa.KVCacheISWA`,
    :class:`~pymem.recurrent.RecurrentMemory`, :class:`~pymem.hybrid.HybridMemory`
    (whose attention part is a KVCache, or a KVCacheISWA for hybrid-iSWA models), or
    None for architectures the reference gives no memory. ``memory.plan`` is set to
    the :class:`MemoryPlan` it was built from.
    """
    plan = plan_memory(spec, params if params is not None else ContextParams())
    mem = build_from_plan(plan)
    if mem is not None:
        mem.plan = plan  # type: ignore[attr-defined]
    return mem
