"""Validation of the inputs of multi-scale deformable attention, with messages naming values."""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["LevelShapes", "check_inputs", "check_module_inputs", "check_module_sizes"]

# The (height, width) of every level as Python ints, given by callers that made
# ``spatial_shapes`` and ``level_start_index`` from them (``FlattenedFeatures`` does).
LevelShapes = Sequence[Tuple[int, int]]


def _can_read_values(*tensors: torch.Tensor) -> bool:
    """False while tracing with torch.compile / torch.export or for tensors without data."""
    if torch.compiler.is_compiling():
        return False
    return all(t.device.type != "meta" for t in tensors)


def check_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    level_shapes: Optional[LevelShapes] = None,
) -> None:
    """
    Checks the arguments of :func:`multi_scale_deformable_attention` (same shapes).

    Ranks, sizes, dtypes and devices are checked, except under ``torch.jit.trace``. The level
    geometry is checked on Python ints when the caller gives ``level_shapes`` (it vouches that
    ``spatial_shapes`` and ``level_start_index`` hold them): positive sizes, sum(h * w) == Nv,
    no tensor read. Without them, the contents of ``spatial_shapes`` and ``level_start_index``
    are read and checked (positive sizes, sum(h * w) == Nv, exclusive cumulative sum) in eager
    mode only: a read is a synchronisation on CUDA and impossible while tracing.

    Raises:
        ValueError: with the offending shapes, dtypes, devices or values.
    """
    if torch.jit.is_tracing():
        # fvcore's tracer: sizes are tensors there, and the model ran eagerly before.
        return
    if value.dim() != 4:
        raise ValueError(f"value must be (B, Nv, H, D), got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "sampling_locations must be (B, Nq, H, L, P, 2), got shape "
            f"{tuple(sampling_locations.shape)}"
        )
    if attention_weights.dim() != 5:
        raise ValueError(
            "attention_weights must be (B, Nq, H, L, P), got shape "
            f"{tuple(attention_weights.shape)}"
        )
    num_levels = sampling_locations.shape[3]
    shapes = {
        "value": tuple(value.shape),
        "sampling_locations": tuple(sampling_locations.shape),
        "attention_weights": tuple(attention_weights.shape),
    }
    for what, sizes in (
        ("batch", (value.shape[0], sampling_locations.shape[0], attention_weights.shape[0])),
        ("heads", (value.shape[2], sampling_locations.shape[2], attention_weights.shape[2])),
    ):
        if not sizes[0] == sizes[1] == sizes[2]:  # no set(): symbolic sizes are unhashable
            raise ValueError(f"The {what} sizes {sizes} of {shapes} disagree")
    for what, dim in (("queries", 1), ("levels", 3), ("points", 4)):
        if sampling_locations.shape[dim] != attention_weights.shape[dim]:
            raise ValueError(
                f"The {what} of sampling_locations {tuple(sampling_locations.shape)} and "
                f"attention_weights {tuple(attention_weights.shape)} disagree"
            )
    if spatial_shapes.shape != (num_levels, 2):
        raise ValueError(
            f"spatial_shapes must be ({num_levels}, 2) for {num_levels} levels, got shape "
            f"{tuple(spatial_shapes.shape)}"
        )
    if level_start_index.shape != (num_levels,):
        raise ValueError(
            f"level_start_index must be ({num_levels},) for {num_levels} levels, got shape "
            f"{tuple(level_start_index.shape)}"
        )
    for name, tensor in (
        ("spatial_shapes", spatial_shapes),
        ("level_start_index", level_start_index),
    ):
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise ValueError(f"{name} must have an integer dtype (int64), got {tensor.dtype}")
    for name, tensor in (
        ("value", value),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor, got {tensor.dtype}")
    devices = {
        "value": value.device,
        "spatial_shapes": spatial_shapes.device,
        "level_start_index": level_start_index.device,
        "sampling_locations": sampling_locations.device,
        "attention_weights": attention_weights.device,
    }
    if any(device != value.device for device in devices.values()):
        described = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"All inputs must be on one device, got {described}")
    if level_shapes is not None:
        if len(level_shapes) != num_levels:
            raise ValueError(
                f"level_shapes {list(level_shapes)} must hold {num_levels} levels (the L of "
                f"sampling_locations {tuple(sampling_locations.shape)})"
            )
        _check_level_sizes(list(level_shapes), value)
        return
    if not _can_read_values(spatial_shapes, level_start_index):
        return
    shape_list = spatial_shapes.tolist()
    _check_level_sizes(shape_list, value)
    expected_starts = [0]
    for h, w in shape_list[:-1]:
        expected_starts.append(expected_starts[-1] + h * w)
    starts = level_start_index.tolist()
    if starts != expected_starts:
        raise ValueError(
            f"level_start_index {starts} is inconsistent with spatial_shapes {shape_list}: "
            f"expected {expected_starts}"
        )


def _check_level_sizes(shape_list: List[Tuple[int, int]], value: torch.Tensor) -> None:
    if any(h <= 0 or w <= 0 for h, w in shape_list):
        raise ValueError(f"spatial_shapes must be positive, got {shape_list}")
    total = sum(h * w for h, w in shape_list)
    if total != value.shape[1]:
        raise ValueError(
            f"spatial_shapes {shape_list} hold sum(h * w) = {total} values but value has "
            f"Nv = {value.shape[1]} (shape {tuple(value.shape)})"
        )


def check_module_sizes(embed_dim: int, num_heads: int, num_levels: int, num_points: int) -> None:
    """
    Checks the constructor arguments of the deformable attention modules.

    Raises:
        ValueError: a size that is not positive, or ``embed_dim`` not divisible by
            ``num_heads``.
    """
    for name, number in (
        ("embed_dim", embed_dim),
        ("num_heads", num_heads),
        ("num_levels", num_levels),
        ("num_points", num_points),
    ):
        if number <= 0:
            raise ValueError(f"{name} must be positive, got {number}")
    if embed_dim % num_heads != 0:
        raise ValueError(
            f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim}, "
            f"num_heads={num_heads}"
        )


def check_module_inputs(
    module: nn.Module,
    query: torch.Tensor,
    reference_points: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    value_padding_mask: Optional[torch.Tensor],
) -> None:
    """
    Checks the shapes given to the ``forward`` of a deformable attention module with the
    attributes ``embed_dim`` (C) and ``num_levels`` (L).

    Raises:
        ValueError: query not (B, Nq, C), value not (B, Nv, C), reference_points not
            (B, Nq, L, 2 or 4), spatial_shapes not (L, 2) or value_padding_mask not (B, Nv).
    """
    channels, num_levels = module.embed_dim, module.num_levels
    if query.dim() != 3 or query.shape[2] != channels:
        raise ValueError(f"query must be (B, Nq, {channels}), got {tuple(query.shape)}")
    if value.dim() != 3 or value.shape[0] != query.shape[0] or value.shape[2] != channels:
        raise ValueError(
            f"value must be (B, Nv, {channels}) with the batch of query {tuple(query.shape)}, "
            f"got {tuple(value.shape)}"
        )
    if (
        reference_points.dim() != 4
        or reference_points.shape[:3] != (query.shape[0], query.shape[1], num_levels)
        or reference_points.shape[3] not in (2, 4)
    ):
        raise ValueError(
            f"reference_points must be (B, Nq, {num_levels}, 2) points or "
            f"(B, Nq, {num_levels}, 4) boxes for query {tuple(query.shape)}, got "
            f"{tuple(reference_points.shape)}"
        )
    if spatial_shapes.shape != (num_levels, 2):
        raise ValueError(
            f"spatial_shapes must have shape ({num_levels}, 2), got {tuple(spatial_shapes.shape)}"
        )
    if value_padding_mask is not None and value_padding_mask.shape != value.shape[:2]:
        raise ValueError(
            f"value_padding_mask must be (B, Nv) = {tuple(value.shape[:2])}, got "
            f"{tuple(value_padding_mask.shape)}"
        )
