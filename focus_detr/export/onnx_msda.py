"""
``focus_detr::ms_deform_attn`` in standard ONNX operators, for ``torch.onnx.export(...,
dynamo=True, custom_translation_table=ONNX_TRANSLATIONS)``.

The op becomes what the PyTorch reference computes
(:mod:`focus_detr.layers.ms_deform_attn_reference`): per level, a slice of the values reshaped
to (B * H, D, h, w) and one ``GridSample`` (opset 16 semantics: bilinear, zero padding,
``align_corners=0``) at ``2 * location - 1``, then the weighted sum over levels and points.
Samples that do not touch their level (including NaN and infinite locations) are moved inside
and get weight 0; a non-finite weight of a sample that does touch its level becomes NaN, as in
the reference. Level sizes and offsets are read from the ``spatial_shapes`` and
``level_start_index`` inputs at run time; the number of levels,
heads, channels per head and points come from the static shapes of the inputs.

Requires ``onnxscript`` (imported by this module).
"""

from typing import Sequence

from onnxscript import opset18 as op

from ..layers.ms_deform_attn_op import FORWARD_OP

__all__ = ["ONNX_OPSET", "ONNX_TRANSLATIONS", "ms_deform_attn_onnx"]

ONNX_OPSET = 18  # GridSample needs >= 16; the translation uses opset 18's operators


def _ints(values: Sequence[int]):
    return op.Constant(value_ints=[int(v) for v in values])


def _scalar_like(value: float, like):
    return op.CastLike(op.Constant(value_float=float(value)), like)


def _merge_leading(tensor, keep_from: int, rank: int):
    """Reshape to (-1, *shape[keep_from:rank]): merge the leading axes into one."""
    trailing = op.Slice(op.Shape(tensor), _ints([keep_from]), _ints([rank]))
    return op.Reshape(tensor, op.Concat(_ints([-1]), trailing, axis=0))


def ms_deform_attn_onnx(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    """
    Args (ONNX values, as the op's schema):
        value: (B, Nv, H, D) float.
        spatial_shapes: (L, 2) int64 (h, w) of every level.
        level_start_index: (L,) int64 offset of every level in ``value``.
        sampling_locations: (B, Nq, H, L, P, 2) normalized (x, y).
        attention_weights: (B, Nq, H, L, P).

    Returns:
        (B, Nq, H * D).
    """
    num_heads, head_dim = value.shape[2], value.shape[3]
    num_levels = sampling_locations.shape[3]
    if not all(isinstance(size, int) for size in (num_heads, head_dim, num_levels)):
        raise ValueError(
            "the ONNX translation of focus_detr::ms_deform_attn needs static heads, channels "
            f"and levels, got value {value.shape} and sampling_locations "
            f"{sampling_locations.shape}"
        )

    # (L, 1, 2) level sizes as (w, h) in the locations' dtype
    sizes = op.Unsqueeze(
        op.CastLike(op.Gather(spatial_shapes, _ints([1, 0]), axis=1), sampling_locations),
        _ints([1]),
    )
    scaled = op.Sub(op.Mul(sampling_locations, sizes), _scalar_like(0.5, sampling_locations))
    inside = op.And(
        op.GreaterOrEqual(scaled, _scalar_like(-1.0, scaled)), op.Less(scaled, sizes)
    )  # False for NaN
    # both coordinates inside: min over the last axis of the 0/1 values
    touching = op.Cast(op.ReduceMin(op.Cast(inside, to=6), _ints([-1]), keepdims=0), to=9)
    locations = op.Where(
        op.Unsqueeze(touching, _ints([-1])),
        sampling_locations,
        _scalar_like(0.5, sampling_locations),
    )
    non_finite = op.Or(op.IsNaN(attention_weights), op.IsInf(attention_weights))
    weights = op.Where(
        touching,
        op.Where(non_finite, _scalar_like(float("nan"), attention_weights), attention_weights),
        _scalar_like(0.0, attention_weights),
    )

    # grids in [-1, 1], heads before queries: (B, H, Nq, L, P, 2)
    grids = op.Sub(op.Mul(locations, _scalar_like(2.0, locations)), _scalar_like(1.0, locations))
    grids = op.Transpose(grids, perm=[0, 2, 1, 3, 4, 5])
    samples = []
    for level in range(num_levels):
        level_shape = op.Gather(spatial_shapes, op.Constant(value_int=level), axis=0)  # (2,)
        start = op.Gather(level_start_index, _ints([level]), axis=0)  # (1,)
        end = op.Add(start, op.ReduceProd(level_shape, keepdims=1))
        level_value = op.Slice(value, start, end, _ints([1]))  # (B, h * w, H, D)
        level_value = op.Transpose(level_value, perm=[0, 2, 3, 1])  # (B, H, D, h * w)
        level_value = op.Reshape(
            level_value, op.Concat(_ints([-1, head_dim]), level_shape, axis=0)
        )  # (B * H, D, h, w)
        grid = _merge_leading(op.Gather(grids, op.Constant(value_int=level), axis=3), 2, 5)
        sampled = op.GridSample(
            level_value, grid, mode="bilinear", padding_mode="zeros", align_corners=0
        )  # (B * H, D, Nq, P)
        samples.append(op.Unsqueeze(sampled, _ints([3])))
    sampled = op.Concat(*samples, axis=3)  # (B * H, D, Nq, L, P)

    # (B, Nq, H, L, P) -> (B * H, 1, Nq, L, P)
    weights = _merge_leading(op.Transpose(weights, perm=[0, 2, 1, 3, 4]), 2, 5)
    weights = op.Unsqueeze(weights, _ints([1]))
    output = op.ReduceSum(op.Mul(sampled, weights), _ints([3, 4]), keepdims=0)  # (B * H, D, Nq)
    batch = op.Slice(op.Shape(value), _ints([0]), _ints([1]))
    output = op.Reshape(output, op.Concat(batch, _ints([num_heads * head_dim, -1]), axis=0))
    return op.Transpose(output, perm=[0, 2, 1])


ONNX_TRANSLATIONS = {FORWARD_OP: ms_deform_attn_onnx}
