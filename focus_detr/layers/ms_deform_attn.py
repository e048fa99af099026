"""The multi-scale deformable attention module (Deformable DETR), batch first."""

import math
from typing import Optional

import torch
from torch import nn

from .ms_deform_attn_function import multi_scale_deformable_attention

__all__ = ["MultiScaleDeformableAttention"]


class MultiScaleDeformableAttention(nn.Module):
    """
    Each query samples ``num_points`` locations per head and level around its reference point
    and returns their weighted sum, projected back to ``embed_dim``. No residual, no dropout:
    the calling layer adds them.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
    ):
        """
        Args:
            embed_dim: channels of queries and values; must be divisible by ``num_heads``.
            num_heads: attention heads.
            num_levels: feature levels sampled by every query.
            num_points: sampling points per head and level.
        """
        super().__init__()
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
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets start on a ring of unit directions (one per head) scaled by point index + 1."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (
            2.0 * math.pi / self.num_heads
        )
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        scale = torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = directions.view(self.num_heads, 1, 1, 2).repeat(
            1, self.num_levels, self.num_points, 1
        )
        with torch.no_grad():
            self.sampling_offsets.bias.copy_((bias * scale).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        value_padding_mask: Optional[torch.Tensor] = None,
        return_sampling: bool = False,
    ):
        """
        Args:
            query: (B, Nq, C) queries, position embedding already added.
            reference_points: (B, Nq, L, 2) normalized (x, y) points, or (B, Nq, L, 4)
                normalized (cx, cy, w, h) boxes; offsets are then scaled by half the box size.
            value: (B, Nv, C) flattened multi-scale features, Nv = sum of h * w.
            spatial_shapes: (L, 2) int64 (h, w) of every level.
            level_start_index: (L,) int64 offset of every level in ``value``.
            value_padding_mask: (B, Nv) bool, True where ``value`` is padding (zeroed).

        Returns:
            (B, Nq, C) attention output.
        """
        batch, num_queries, _ = query.shape
        num_values = value.shape[1]
        if spatial_shapes.shape != (self.num_levels, 2):
            raise ValueError(
                f"spatial_shapes must have shape ({self.num_levels}, 2), got "
                f"{tuple(spatial_shapes.shape)}"
            )
        if reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                f"reference_points must end in 2 (points) or 4 (boxes), got "
                f"{tuple(reference_points.shape)}"
            )
        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(batch, num_values, self.num_heads, self.embed_dim // self.num_heads)
        offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.num_heads, self.num_levels, self.num_points, 2
        )
        weights = self.attention_weights(query).view(
            batch, num_queries, self.num_heads, self.num_levels * self.num_points
        )
        weights = weights.softmax(-1).view(
            batch, num_queries, self.num_heads, self.num_levels, self.num_points
        )
        if reference_points.shape[-1] == 2:
            # offsets are in cells of each level: divide by (w, h)
            normalizer = spatial_shapes.flip(-1).to(offsets.dtype)
            locations = (
                reference_points[:, :, None, :, None, :]
                + offsets / normalizer[None, None, None, :, None, :]
            )
        else:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / self.num_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        output = multi_scale_deformable_attention(
            value, spatial_shapes, level_start_index, locations, weights
        )
        if return_sampling:
            return self.output_proj(output), locations, weights
        return self.output_proj(output)
