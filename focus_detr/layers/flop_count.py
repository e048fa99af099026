"""fvcore FLOP counting of the deformable attention op.

fvcore traces models with ``torch.jit.trace``, where ``focus_detr::ms_deform_attn`` is one node
that it does not know. Register the handle with::

    from fvcore.nn import FlopCountAnalysis
    from focus_detr.layers.flop_count import MSDA_FLOP_HANDLES

    flops = FlopCountAnalysis(model, inputs).set_op_handle(**MSDA_FLOP_HANDLES)
"""

from typing import Any, Dict, List

from fvcore.nn.jit_handles import get_shape

__all__ = ["MSDA_FLOP_HANDLES", "ms_deform_attn_flop_count", "ms_deform_attn_flop_jit"]

# Multiply-adds per channel of one sample: 4 for the bilinear interpolation of the 4 neighbouring
# cells, 1 for the attention weighting.
MULTIPLY_ADDS_PER_SAMPLE_CHANNEL = 5


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
        * (MULTIPLY_ADDS_PER_SAMPLE_CHANNEL)
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
    value_shape = get_shape(inputs[0])
    location_shape = get_shape(inputs[3])
    if value_shape is None or location_shape is None:
        raise ValueError("fvcore traced focus_detr::ms_deform_attn without complete input shapes")
    batch, _, num_heads, head_dim = value_shape
    _, num_queries, _, num_levels, num_points, _ = location_shape
    return ms_deform_attn_flop_count(
        batch, num_queries, num_heads, num_levels, num_points, head_dim
    )


MSDA_FLOP_HANDLES: Dict[str, Any] = {"focus_detr::ms_deform_attn": ms_deform_attn_flop_jit}
