"""The K-shift: rotate cached K by each cell's pending position delta (``build_graph_shift``).

After ``seq_add`` / ``seq_div`` the cells know their new positions but K still holds keys
rotated for the old ones. RoPE composes additively, so rotating by ``shift = new - old``
fixes them in place. One graph per device covers every layer with RoPE:

    K view [n_rot, n_head_kv, kv_size * n_stream]  (the first n_rot dims of each head)
      f16/f32:   rope_ext(view, shift) -> cpy back into the view
      other types (quantized, bf16): cast to f32 -> rope_ext -> cpy (convert) back

Per-layer parameters come from ``LayerSpec.rope`` (mode, freq base/scale, YaRN fields).
M-RoPE and iM-RoPE are shifted as NEOX, as the reference does. Not supported: rope
frequency factors, the MLA "nope" offset, and K stored Hadamard-rotated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pymem.kv.inputs import build_k_shift
from pymem.spec import RopeType

if TYPE_CHECKING:
    from pymem.kv.cache import KVCache


def rope_mode(rope_type: RopeType) -> int:
    """The ggml rope mode used for a shift: M-RoPE variants rotate as NEOX."""
    if rope_type in (RopeType.MROPE, RopeType.IMROPE):
        return int(RopeType.NEOX)
    return int(rope_type)


def apply_k_shift(kv: KVCache) -> None:
    """Rotate every RoPE layer's K by the cells' pending shifts (one graph per device)."""
    import pymem.ggml as gg

    shift = build_k_shift(kv)
    n_cells = kv.kv_size * kv.n_stream
    by_dev: dict[str, list] = {}
    for layer in kv.layers:
        if kv._has_rope(layer.il):
            by_dev.setdefault(layer.device, []).append(layer)
    for dev, layers in by_dev.items():
        runner = kv._runner(dev)
        with gg.Context(max_tensors=8 * len(layers) + 8) as ctx:
            pos = ctx.new_tensor("i32", (n_cells,), name="k_shift", input=True)
            outs = []
            for layer in layers:
                lay = kv.spec.layers[layer.il]
                rope = lay.rope
                assert rope is not None
                k = layer.k.ptr
                head = int(gg.lib.ggml_row_size(k.type, lay.n_embd_head_k))
                view = ctx.view_3d(
                    k,
                    rope.n_rot,
                    lay.n_head_kv,
                    n_cells,
                    head,
                    int(gg.lib.ggml_row_size(k.type, lay.n_embd_k_gqa)),
                    0,
                )
                src = view
                if kv.type_k.name not in ("f16", "f32"):
                    # rope reads f16/f32 only (bf16 aborts the CPU backend): go through f32
                    src = ctx.cast(view, gg.lib.GGML_TYPE_F32)
                rot = ctx.rope(src, pos, rope, mode=rope_mode(rope.rope_type))
                outs.append(ctx.cpy(rot, view))
            runner.run(ctx, outs, inputs={pos: shift}, read=[])
