"""Pure-PyTorch multi-scale deformable attention: the reference every kernel is tested against."""

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["multi_scale_deformable_attention_reference"]


def multi_scale_deformable_attention_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """
    Bilinear sampling with zero padding (``align_corners=False``) of every level, weighted sum.

    Args:
        value: (B, Nv, H, D) values of all levels, flattened level after level.
        spatial_shapes: (L, 2) int64, the (height, width) of each level; sum(h * w) == Nv.
        level_start_index: (L,) int64, offset of each level in ``value``. Unused here (it follows
            from ``spatial_shapes``) but kept so every backend has the same signature.
        sampling_locations: (B, Nq, H, L, P, 2) normalized (x, y); (0, 0) is the top-left corner
            of the level and (1, 1) its bottom-right corner. Values outside [0, 1] sample zeros.
        attention_weights: (B, Nq, H, L, P) weights of the samples.

    Returns:
        (B, Nq, H * D) tensor.
    """
    del level_start_index
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    sizes: Sequence[int] = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_per_level = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        # (B, HW, H, D) -> (B * H, D, h, w)
        level_value = (
            value_per_level[level]
            .flatten(2)
            .transpose(1, 2)
            .reshape(batch * num_heads, head_dim, int(height), int(width))
        )
        # (B, Nq, H, P, 2) -> (B * H, Nq, P, 2)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # (B * H, D, Nq, P)
        sampled.append(
            F.grid_sample(
                level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )
    # (B, Nq, H, L, P) -> (B * H, 1, Nq, L * P)
    weights = attention_weights.transpose(1, 2).reshape(
        batch * num_heads, 1, num_queries, num_levels * num_points
    )
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()
