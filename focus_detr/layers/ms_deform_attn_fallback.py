"""PyTorch implementation of the backward of the deformable attention op, from ``grid_sample``.

It backs ``focus_detr::ms_deform_attn_backward`` when the compiled kernels are not loaded (or
not built for the tensors' device). It recomputes the per-level samples of the reference and
calls ``grid_sample``'s own backward, so it shares the reference's semantics exactly.
"""

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["multi_scale_deformable_attention_reference_backward"]


def multi_scale_deformable_attention_reference_backward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    grad_output: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
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
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    # (B, Nq, H * D) -> (B * H, D, Nq, 1), the gradient of every sample before weighting
    grad_sampled = (
        grad_output.reshape(batch, num_queries, num_heads, head_dim)
        .permute(0, 2, 3, 1)
        .reshape(batch * num_heads, head_dim, num_queries, 1)
    )
    grad_values, grad_grids, grad_weights = [], [], []
    for level, (height, width) in enumerate(shapes):
        level_value = (
            value_per_level[level]
            .flatten(2)
            .transpose(1, 2)
            .reshape(batch * num_heads, head_dim, height, width)
        )
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (B*H, Nq, P, 2)
        level_weights = attention_weights[:, :, :, level].transpose(1, 2)  # (B, H, Nq, P)
        level_weights = level_weights.reshape(batch * num_heads, 1, num_queries, num_points)
        sampled = F.grid_sample(
            level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (B*H, D, Nq, P)
        grad_weights.append((sampled * grad_sampled).sum(1))  # (B*H, Nq, P)
        # interpolation_mode 0 = bilinear, padding_mode 0 = zeros
        grad_level_value, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
            grad_sampled * level_weights,
            level_value,
            level_grid,
            0,
            0,
            False,
            [True, True],
        )
        # (B*H, D, h, w) -> (B, h*w, H, D)
        grad_values.append(
            grad_level_value.reshape(batch, num_heads, head_dim, height * width).permute(0, 3, 1, 2)
        )
        grad_grids.append(grad_grid)
    grad_value = torch.cat(grad_values, dim=1).contiguous()
    # (L, B*H, Nq, P, 2) -> (B, Nq, H, L, P, 2); d(grid)/d(location) = 2
    grad_locations = 2 * torch.stack(grad_grids, dim=0).reshape(
        num_levels, batch, num_heads, num_queries, num_points, 2
    ).permute(1, 3, 2, 0, 4, 5)
    grad_attention = (
        torch.stack(grad_weights, dim=0)
        .reshape(num_levels, batch, num_heads, num_queries, num_points)
        .permute(1, 3, 2, 0, 4)
    )
    return grad_value, grad_locations.contiguous(), grad_attention.contiguous()
