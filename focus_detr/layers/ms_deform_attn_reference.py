"""Pure-PyTorch multi-scale deformable attention: the reference every kernel is tested against.

Semantics (shared with the compiled kernels of ``focus_detr/csrc``): every sample is a bilinear
interpolation with zero padding (``align_corners=False``) of its level at
``x = loc_x * W - 0.5``, ``y = loc_y * H - 0.5`` (cell ``j`` has its centre at ``j``), weighted
by its attention weight. Two rules make non-finite inputs well defined:

- a sample *touches its level* when ``-1 <= x < W`` and ``-1 <= y < H``; a sample that does not
  (NaN, +-inf or huge locations included) contributes exactly zero, whatever its attention
  weight (even NaN), and gets zero gradients: nothing it holds reaches the output or
  ``grad_value``. ``grid_sample`` alone would return NaN for NaN / inf coordinates, so the
  reference moves those samples inside before sampling and masks them;
- a non-finite attention weight (NaN, +-inf) of a sample that touches its level counts as NaN:
  the output of its (query, head) becomes NaN, as do the gradients that it multiplies (its
  location's, and ``grad_value`` at the cells it touches); its own gradient stays the
  derivative of the output with respect to it (the sample's values times ``grad_output``).
"""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "multi_scale_bilinear_sample",
    "multi_scale_deformable_attention_reference",
    "multi_scale_deformable_attention_reference_backward",
    "samples_touching_levels",
]

# interpolation_mode and padding_mode of aten::grid_sampler_2d_backward
_BILINEAR, _ZEROS = 0, 0


def samples_touching_levels(
    sampling_locations: torch.Tensor, spatial_shapes: torch.Tensor
) -> torch.Tensor:
    """
    Args:
        sampling_locations: (..., L, P, 2) normalized (x, y).
        spatial_shapes: (L, 2) integer (height, width) of each level.

    Returns:
        (..., L, P) bool, True where the bilinear footprint of a sample overlaps its level
        (``-1 <= loc * size - 0.5 < size`` in x and y, computed in the dtype of the locations
        exactly as the kernels do); False for NaN and infinite locations.
    """
    size = spatial_shapes.flip(-1).to(sampling_locations.dtype)[:, None, :]  # (L, 1, 2): (w, h)
    scaled = sampling_locations * size - 0.5
    return ((scaled >= -1) & (scaled < size)).all(-1)


def _masked_inputs(
    spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor, attention_weights: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(touching, locations, weights) where the samples that do not touch their level are moved
    to the centre with a zero weight and non-finite weights are NaN (module docstring)."""
    touching = samples_touching_levels(sampling_locations, spatial_shapes)
    locations = torch.where(touching[..., None], sampling_locations, 0.5)
    # + NaN rather than where(finite, w, NaN): the gradient with respect to w stays 1
    nan_if_not_finite = torch.zeros_like(attention_weights).masked_fill(
        ~attention_weights.isfinite(), float("nan")
    )
    weights = torch.where(touching, attention_weights + nan_if_not_finite, 0.0)
    return touching, locations, weights


def _level_values(value: torch.Tensor, shapes: List[Tuple[int, int]]) -> List[torch.Tensor]:
    """(B, Nv, H, D) -> per level (B * H, D, h, w)."""
    batch, _, num_heads, head_dim = value.shape
    return [
        level.flatten(2).transpose(1, 2).reshape(batch * num_heads, head_dim, height, width)
        for level, (height, width) in zip(value.split([h * w for h, w in shapes], dim=1), shapes)
    ]


def _level_grids(sampling_locations: torch.Tensor, level: int) -> torch.Tensor:
    """(B, Nq, H, L, P, 2) in [0, 1] -> (B * H, Nq, P, 2) in [-1, 1] of one level."""
    return (2 * sampling_locations[:, :, :, level] - 1).transpose(1, 2).flatten(0, 1)


def _sample(value: torch.Tensor, shapes, sampling_locations: torch.Tensor) -> torch.Tensor:
    """Samples of every level, (B * H, D, Nq, L * P), from locations that touch their level."""
    sampled = [
        F.grid_sample(
            level_value,
            _level_grids(sampling_locations, level),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )  # (B * H, D, Nq, P)
        for level, level_value in enumerate(_level_values(value, shapes))
    ]
    return torch.stack(sampled, dim=-2).flatten(-2)


def _shapes(
    spatial_shapes: torch.Tensor, level_shapes: Optional[Sequence[Tuple[int, int]]] = None
) -> List[Tuple[int, int]]:
    """The level shapes as Python ints: ``level_shapes`` when given, else read from the tensor."""
    if level_shapes is not None:
        return [(int(h), int(w)) for h, w in level_shapes]
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


def multi_scale_bilinear_sample(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    level_shapes: Optional[Sequence[Tuple[int, int]]] = None,
) -> torch.Tensor:
    """
    The samples themselves, before any weighting (differentiable, any device).

    Args:
        value: (B, Nv, H, D) values of all levels, flattened level after level.
        spatial_shapes: (L, 2) integer (height, width) of each level; sum(h * w) == Nv.
        sampling_locations: (B, Nq, H, L, P, 2) normalized (x, y).
        level_shapes: the contents of ``spatial_shapes`` as Python ints, when the caller has
            them: the tensor is then not read back.

    Returns:
        (B, Nq, H, L, P, D) bilinear samples with zero padding; exactly zero (and without
        gradient) for samples that do not touch their level, non-finite locations included.
    """
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    touching = samples_touching_levels(sampling_locations, spatial_shapes)
    locations = torch.where(touching[..., None], sampling_locations, 0.5)
    sampled = _sample(value, _shapes(spatial_shapes, level_shapes), locations)
    sampled = sampled.view(batch, num_heads, head_dim, num_queries, num_levels, num_points)
    return torch.where(touching[..., None], sampled.permute(0, 3, 1, 4, 5, 2), 0.0)


def multi_scale_deformable_attention_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    level_shapes: Optional[Sequence[Tuple[int, int]]] = None,
) -> torch.Tensor:
    """
    Bilinear sampling with zero padding (``align_corners=False``) of every level, weighted sum.

    Args:
        value: (B, Nv, H, D) values of all levels, flattened level after level.
        spatial_shapes: (L, 2) int64, the (height, width) of each level; sum(h * w) == Nv.
        level_start_index: (L,) int64, offset of each level in ``value``. Unused here (it follows
            from ``spatial_shapes``) but kept so every backend has the same signature.
        sampling_locations: (B, Nq, H, L, P, 2) normalized (x, y); (0, 0) is the top-left corner
            of the level and (1, 1) its bottom-right corner. Values outside [0, 1] sample zeros;
            non-finite ones contribute nothing (module docstring).
        attention_weights: (B, Nq, H, L, P) weights of the samples.
        level_shapes: the contents of ``spatial_shapes`` as Python ints, when the caller has
            them: the tensor is then not read back.

    Returns:
        (B, Nq, H * D) tensor.
    """
    del level_start_index
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    _, locations, weights = _masked_inputs(spatial_shapes, sampling_locations, attention_weights)
    shapes = _shapes(spatial_shapes, level_shapes)
    sampled = _sample(value, shapes, locations)  # (B * H, D, Nq, L * P)
    # (B, Nq, H, L, P) -> (B * H, 1, Nq, L * P)
    weights = weights.transpose(1, 2).reshape(
        batch * num_heads, 1, num_queries, num_levels * num_points
    )
    output = (sampled * weights).sum(-1)
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()


def multi_scale_deformable_attention_reference_backward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    grad_output: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Backward of :func:`multi_scale_deformable_attention_reference` from ``grid_sample``'s own
    backward; it backs ``focus_detr::ms_deform_attn_backward`` where no compiled kernel is.

    Args:
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights: as
            in :func:`multi_scale_deformable_attention_reference`.
        grad_output: (B, Nq, H * D) gradient of the output.

    Returns:
        (grad_value (B, Nv, H, D), grad_sampling_locations (B, Nq, H, L, P, 2),
        grad_attention_weights (B, Nq, H, L, P)).
    """
    del level_start_index
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = _shapes(spatial_shapes)
    touching, locations, weights = _masked_inputs(
        spatial_shapes, sampling_locations, attention_weights
    )
    # (B, Nq, H * D) -> (B * H, D, Nq, 1), the gradient of every sample before weighting
    grad_sampled = (
        grad_output.reshape(batch, num_queries, num_heads, head_dim)
        .permute(0, 2, 3, 1)
        .reshape(batch * num_heads, head_dim, num_queries, 1)
    )
    grad_values, grad_grids, grad_weights = [], [], []
    for level, level_value in enumerate(_level_values(value, shapes)):
        height, width = shapes[level]
        level_grid = _level_grids(locations, level)  # (B * H, Nq, P, 2)
        level_weights = weights[:, :, :, level].transpose(1, 2)  # (B, H, Nq, P)
        level_weights = level_weights.reshape(batch * num_heads, 1, num_queries, num_points)
        sampled = F.grid_sample(
            level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (B * H, D, Nq, P)
        grad_weights.append((sampled * grad_sampled).sum(1))  # (B * H, Nq, P)
        grad_level_value, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
            grad_sampled * level_weights,
            level_value,
            level_grid,
            _BILINEAR,
            _ZEROS,
            False,
            [True, True],
        )
        # (B * H, D, h, w) -> (B, h * w, H, D)
        grad_values.append(
            grad_level_value.reshape(batch, num_heads, head_dim, height * width).permute(0, 3, 1, 2)
        )
        grad_grids.append(grad_grid)
    grad_value = torch.cat(grad_values, dim=1).contiguous()
    # (L, B * H, Nq, P, 2) -> (B, Nq, H, L, P, 2); d(grid)/d(location) = 2
    grad_locations = 2 * torch.stack(grad_grids, dim=0).reshape(
        num_levels, batch, num_heads, num_queries, num_points, 2
    ).permute(1, 3, 2, 0, 4, 5)
    grad_attention = (
        torch.stack(grad_weights, dim=0)
        .reshape(num_levels, batch, num_heads, num_queries, num_points)
        .permute(1, 3, 2, 0, 4)
    )
    grad_locations = torch.where(touching[..., None], grad_locations, 0.0)
    grad_attention = torch.where(touching, grad_attention, 0.0)
    return grad_value, grad_locations.contiguous(), grad_attention.contiguous()
