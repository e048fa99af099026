"""fvcore FLOP handles of the ops that fvcore's ``FlopCountAnalysis`` does not count.

fvcore traces models with ``torch.jit.trace`` and counts the nodes it has a handle for, in its
unit: one fused multiply-add = one flop (a product of (m, k) and (k, n) costs m * k * n). The
handles here follow that unit:

- ``focus_detr::ms_deform_attn``, the deformable attention op (:data:`MSDA_FLOP_HANDLES`);
- the attention ops of ``nn.MultiheadAttention`` (:data:`ATTENTION_FLOP_HANDLES`). Traced under
  torch 2.x, it calls ``aten::bmm`` and ``aten::linear`` with ``need_weights=True`` (counted by
  fvcore), ``aten::scaled_dot_product_attention`` with ``need_weights=False``, and, for
  self-attention in eval mode without autograd, the fused fast path
  ``aten::_native_multi_head_attention`` (projections included). The flash / memory-efficient /
  cuDNN variants of scaled dot-product attention, when called directly, have the same inputs.

Register them all with::

    from fvcore.nn import FlopCountAnalysis
    from focus_detr.layers.flop_count import ALL_FLOP_HANDLES

    flops = FlopCountAnalysis(model, inputs).set_op_handle(**ALL_FLOP_HANDLES)

``aten::grid_sampler`` (used by :class:`~focus_detr.layers.KeyAwareDeformableAttention` to
sample keys) is counted by fvcore itself: 4 per output element, the bilinear interpolation.
Softmax, scaling and masking are not counted, as fvcore does for its own ops.
"""

import math
from typing import Any, Dict, List

from fvcore.nn.jit_handles import get_shape

__all__ = [
    "ALL_FLOP_HANDLES",
    "ATTENTION_FLOP_HANDLES",
    "MSDA_FLOP_HANDLES",
    "ms_deform_attn_flop_count",
    "ms_deform_attn_flop_jit",
    "native_multi_head_attention_flop_jit",
    "scaled_dot_product_attention_flop_jit",
]

# Multiply-adds per channel of one sample: 4 for the bilinear interpolation of the 4 neighbouring
# cells, 1 for the attention weighting.
MULTIPLY_ADDS_PER_SAMPLE_CHANNEL = 5


def _shapes(inputs: List[Any], count: int, op: str) -> List[List[int]]:
    shapes = [get_shape(value) for value in inputs[:count]]
    if any(shape is None for shape in shapes):
        raise ValueError(f"fvcore traced {op} without complete input shapes: {shapes}")
    return shapes


def ms_deform_attn_flop_count(
    batch: int, num_queries: int, num_heads: int, num_levels: int, num_points: int, head_dim: int
) -> int:
    """
    FLOPs of one forward of the op, in fvcore's unit (one fused multiply-add = one flop):
    ``B * Nq * H * L * P * D * 5``, i.e. for every sample and channel 4 multiply-adds of the
    bilinear interpolation and 1 of the attention weighting. The bilinear weights (a handful of
    operations per sample, not per channel) are not counted.
    """
    return (
        batch
        * num_queries
        * num_heads
        * num_levels
        * num_points
        * head_dim
        * MULTIPLY_ADDS_PER_SAMPLE_CHANNEL
    )


def ms_deform_attn_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """
    fvcore handle of ``focus_detr::ms_deform_attn``.

    Args:
        inputs: the jit values (value (B, Nv, H, D), spatial_shapes, level_start_index,
            sampling_locations (B, Nq, H, L, P, 2), attention_weights).
        outputs: the jit value of the output (B, Nq, H * D).

    Returns:
        :func:`ms_deform_attn_flop_count` of the traced shapes.
    """
    value_shape, _, _, location_shape = _shapes(inputs, 4, "focus_detr::ms_deform_attn")
    batch, _, num_heads, head_dim = value_shape
    _, num_queries, _, num_levels, num_points, _ = location_shape
    return ms_deform_attn_flop_count(
        batch, num_queries, num_heads, num_levels, num_points, head_dim
    )


def scaled_dot_product_attention_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """
    fvcore handle of ``aten::scaled_dot_product_attention`` and its fused variants.

    Args:
        inputs: the jit values of query (N..., Lq, E), key (N..., S, E) and value
            (N..., S, Ev) first (N...: batch and heads), then masks and options.
        outputs: unused.

    Returns:
        ``prod(N...) * Lq * S * (E + Ev)``: the products ``query @ key^T`` (Lq * S * E) and
        ``softmax(...) @ value`` (Lq * S * Ev) of every batch and head. With grouped key /
        value heads, every query head still attends to all S keys.
    """
    query, key, value = _shapes(inputs, 3, "scaled dot-product attention")
    *batch_dims, num_queries, qk_dim = query
    num_keys, value_dim = key[-2], value[-1]
    return math.prod(batch_dims) * num_queries * num_keys * (qk_dim + value_dim)


def native_multi_head_attention_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """
    fvcore handle of ``aten::_native_multi_head_attention``, the fused fast path of
    ``nn.MultiheadAttention`` (batch first) that includes the projections.

    Args:
        inputs: the jit values of query (B, Lq, E), key (B, S, E), value (B, S, E), then
            embed_dim, num_heads, the projection weights and biases, masks and options.
        outputs: unused.

    Returns:
        ``B * E * (Lq * E + 2 * S * E + 2 * Lq * S + Lq * E)``: the query, key and value
        projections (Lq * E * E + 2 * S * E * E), the H heads of ``query @ key^T`` and
        ``softmax(...) @ value`` (2 * Lq * S * E over all heads) and the output projection
        (Lq * E * E). The biases are not counted, as fvcore does for ``aten::linear``.
    """
    query, key, _ = _shapes(inputs, 3, "aten::_native_multi_head_attention")
    batch, num_queries, embed_dim = query
    num_keys = key[1]
    projections = (2 * num_queries + 2 * num_keys) * embed_dim * embed_dim
    attention = 2 * num_queries * num_keys * embed_dim
    return batch * (projections + attention)


MSDA_FLOP_HANDLES: Dict[str, Any] = {"focus_detr::ms_deform_attn": ms_deform_attn_flop_jit}

ATTENTION_FLOP_HANDLES: Dict[str, Any] = {
    "aten::scaled_dot_product_attention": scaled_dot_product_attention_flop_jit,
    "aten::_scaled_dot_product_flash_attention": scaled_dot_product_attention_flop_jit,
    "aten::_scaled_dot_product_flash_attention_for_cpu": scaled_dot_product_attention_flop_jit,
    "aten::_scaled_dot_product_efficient_attention": scaled_dot_product_attention_flop_jit,
    "aten::_scaled_dot_product_cudnn_attention": scaled_dot_product_attention_flop_jit,
    "aten::_native_multi_head_attention": native_multi_head_attention_flop_jit,
}

ALL_FLOP_HANDLES: Dict[str, Any] = {**MSDA_FLOP_HANDLES, **ATTENTION_FLOP_HANDLES}
