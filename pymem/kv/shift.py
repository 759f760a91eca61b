"""The K-shift: rotate cached K by each cell's pending position delta (``build_graph_shift``).

After ``seq_add`` / ``seq_div`` the cells know their new positions but K still holds keys
rotated for the old ones. RoPE composes additively, so rotating by ``shift = new - old``
fixes them in place. One graph per device covers every layer with RoPE:

    K view [n_rot, n_head_kv, kv_size * n_stream]  (the first n_rot dims of each head)
      f16/f32:   rope_ext(view, shift) -> cpy back into the view
      other types (quantized, bf16): cast to f32 -> rope_ext -> cpy (convert) back

Per-layer parameters come from ``LayerSpec.rope`` (mode, freq base/scale, YaRN fields).
M-RoPE and iM-RoPE are shifted as NEOX, as the reference does. An MLA cache (K rows
[latent | rope part]) rotates the last ``n_rot`` dims of each head, as the reference does
when ``n_lora_kv`` > 0. Frequency factors (``RopeSpec.freq_factors``: ``rope_freqs`` of
Llama-3.1-style files, Phi-3's long / short factors as the factory chose them) go into
the rotation as the reference passes ``get_rope_factors``. Not supported: K stored
Hadamard-rotated.

:func:`apply_k_shift` takes the cache's layout, the layers to rotate, the pending shift of
every cell (``KVCache.k_shift()``) and a callable giving the graph runner of a device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

import pymem.ggml as gg
from pymem.kv.layout import KVLayer, KVLayout
from pymem.spec import LayerSpec, ModelSpec, RopeType


def has_rope(lay: LayerSpec) -> bool:
    """Whether model layer ``lay`` rotates K (and so needs the K-shift)."""
    rope = lay.rope
    return rope is not None and rope.rope_type != RopeType.NONE and rope.n_rot > 0


def rope_mode(rope_type: RopeType) -> int:
    """The ggml rope mode used for a shift: M-RoPE variants rotate as NEOX."""
    if rope_type in (RopeType.MROPE, RopeType.IMROPE):
        return int(RopeType.NEOX)
    return int(rope_type)


def apply_k_shift(
    layout: KVLayout,
    spec: ModelSpec,
    layers: Sequence[KVLayer],
    shift: np.ndarray,
    runner: Callable[[str], gg.GraphRunner],
) -> None:
    """Rotate the K of ``layers`` (each :func:`has_rope`) by ``shift``, the pending shift of
    every cell, streams concatenated (int32 ``[kv_size * n_stream]``). One graph per
    device, run by ``runner(device)``."""
    n_cells = layout.kv_size * layout.n_stream
    by_dev: dict[str, list[KVLayer]] = {}
    for layer in layers:
        by_dev.setdefault(layer.device, []).append(layer)
    for dev, dev_layers in by_dev.items():
        graph_runner = runner(dev)
        with gg.Context(max_tensors=9 * len(dev_layers) + 8) as ctx:
            pos = ctx.new_tensor("i32", (n_cells,), name="k_shift", input=True)
            feed: dict[object, np.ndarray] = {pos: shift}
            outs = []
            for layer in dev_layers:
                lay = spec.layers[layer.il]
                rope = lay.rope
                assert rope is not None
                k = layer.k.ptr
                head = int(gg.lib.ggml_row_size(k.type, lay.n_embd_head_k))
                # MLA keeps the rotated part after the latent: E.g. head 12, n_rot 4 -> dims 8..11
                nope = lay.n_embd_head_k - rope.n_rot if spec.is_mla else 0
                view = ctx.view_3d(
                    k,
                    rope.n_rot,
                    lay.n_head_kv,
                    n_cells,
                    head,
                    int(gg.lib.ggml_row_size(k.type, lay.n_embd_k_gqa)),
                    int(gg.lib.ggml_row_size(k.type, nope)),
                )
                src = view
                if layout.type_k.name not in ("f16", "f32"):
                    # rope reads f16/f32 only (bf16 aborts the CPU backend): go through f32
                    src = ctx.cast(view, gg.lib.GGML_TYPE_F32)
                factors = None
                if rope.freq_factors is not None:
                    factors = ctx.new_tensor(
                        "f32",
                        (len(rope.freq_factors),),
                        name=f"rope_factors_{layer.il}",
                        input=True,
                    )
                    feed[factors] = np.asarray(rope.freq_factors, dtype=np.float32)
                rot = ctx.rope(src, pos, rope, mode=rope_mode(rope.rope_type), factors=factors)
                outs.append(ctx.cpy(rot, view))
            graph_runner.run(ctx, outs, inputs=feed, read=[])
