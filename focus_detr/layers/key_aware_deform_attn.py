"""Key-aware multi-scale deformable attention (Lite DETR, CVPR 2023), batch first.

Deformable attention predicts its attention weights from the query alone. The key-aware variant
samples, at every sampling location, a key as well as a value and weighs the samples by the
softmax of the query-key dot products, so that the weights depend on what the samples show.
As in Lite DETR's code (``proj_key=False``), the keys are the projected values themselves.
The weighted value sum is the deformable attention op (the compiled kernels when loaded); the
keys are sampled by :func:`multi_scale_bilinear_sample` (``grid_sample``, differentiable).
"""

import math
from typing import Optional, Tuple, Union

import torch
from torch import nn

from .ms_deform_attn import (
    deformable_sampling_locations,
    init_sampling_offsets,
    multi_scale_deformable_attention,
)
from .ms_deform_attn_checks import LevelShapes, check_module_inputs, check_module_sizes
from .ms_deform_attn_reference import multi_scale_bilinear_sample

__all__ = ["KeyAwareDeformableAttention", "key_aware_deformable_attention"]


def key_aware_deformable_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    *,
    level_shapes: Optional[LevelShapes] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Deformable attention whose weights are the softmax, over the L * P samples of a head, of
    ``<query_h, key sampled at the location> / sqrt(D)``.

    Args:
        query: (B, Nq, H, D) projected queries, split into heads.
        key: (B, Nv, H, D) projected keys of all levels, flattened level after level.
        value: (B, Nv, H, D) projected values, same layout as ``key``.
        spatial_shapes: (L, 2) integer (height, width) of each level.
        level_start_index: (L,) integer offset of each level in ``key`` and ``value``.
        sampling_locations: (B, Nq, H, L, P, 2) normalized (x, y); samples outside their level
            read zero keys and values (their logit is 0).
        level_shapes: the contents of ``spatial_shapes`` as Python ints, from a caller that
            made the tensors from them: they are then not read back.

    Returns:
        (output (B, Nq, H * D), attention_weights (B, Nq, H, L, P)).
    """
    batch, num_queries, num_heads, head_dim = query.shape
    if key.shape != value.shape or tuple(key.shape[::2]) != (batch, num_heads):
        raise ValueError(
            f"key and value must be (B, Nv, H, D) = (B, Nv, {num_heads}, {head_dim}) with B = "
            f"{batch}, got key {tuple(key.shape)} and value {tuple(value.shape)}"
        )
    if key.shape[3] != head_dim:
        raise ValueError(f"key {tuple(key.shape)} and query {tuple(query.shape)} differ in D")
    _, _, _, num_levels, num_points, _ = sampling_locations.shape
    # (B, Nq, H, L, P, D) -> (B, Nq, H, D, L * P)
    keys = multi_scale_bilinear_sample(key, spatial_shapes, sampling_locations, level_shapes)
    keys = keys.flatten(3, 4).transpose(-1, -2)
    # (B, Nq, H, 1, D) @ (B, Nq, H, D, L * P) -> (B, Nq, H, 1, L * P)
    logits = torch.matmul(query.unsqueeze(-2), keys).squeeze(-2) / math.sqrt(head_dim)
    weights = logits.softmax(-1).view(batch, num_queries, num_heads, num_levels, num_points)
    output = multi_scale_deformable_attention(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        weights,
        level_shapes=level_shapes,
    )
    return output, weights


class KeyAwareDeformableAttention(nn.Module):
    """
    Key-aware deformable attention: offsets from the query as in
    :class:`~focus_detr.layers.MultiScaleDeformableAttention`, attention weights from the
    query-key dot products of the sampled keys. The keys are the values' projection
    (``value_proj``, Lite DETR's ``proj_key=False``): no key projection and no attention-weight
    layer; ``query_proj`` projects the queries. Same constructor and forward as
    ``MultiScaleDeformableAttention``; no residual, no dropout.
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
        check_module_sizes(embed_dim, num_heads, num_levels, num_points)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.query_proj = nn.Linear(embed_dim, embed_dim)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets on Deformable DETR's ring; Xavier projections with zero biases."""
        init_sampling_offsets(
            self.sampling_offsets,
            num_heads=self.num_heads,
            num_levels=self.num_levels,
            num_points=self.num_points,
        )
        for projection in (self.query_proj, self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(projection.weight)
            nn.init.zeros_(projection.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        value_padding_mask: Optional[torch.Tensor] = None,
        return_sampling: bool = False,
        *,
        level_shapes: Optional[LevelShapes] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """
        Args:
            query: (B, Nq, C) queries, position embedding already added.
            reference_points: (B, Nq, L, 2) normalized (x, y) points, or (B, Nq, L, 4)
                normalized (cx, cy, w, h) boxes; offsets are then scaled by half the box size.
            value: (B, Nv, C) flattened multi-scale features, Nv = sum of h * w; their
                projection gives both the keys and the values.
            spatial_shapes: (L, 2) int64 (h, w) of every level.
            level_start_index: (L,) int64 offset of every level in ``value``.
            value_padding_mask: (B, Nv) bool, True where ``value`` is padding (keys and values
                zeroed).
            return_sampling: also return the sampling locations and attention weights.
            level_shapes: the contents of ``spatial_shapes`` as Python ints, from a caller that
                made the tensors from them: they are then not read back.

        Returns:
            (B, Nq, C) attention output; with ``return_sampling``, the tuple (output,
            sampling_locations (B, Nq, H, L, P, 2), attention_weights (B, Nq, H, L, P)).
        """
        check_module_inputs(
            self, query, reference_points, value, spatial_shapes, value_padding_mask
        )
        batch, num_queries, _ = query.shape
        head_shape = (self.num_heads, self.embed_dim // self.num_heads)
        values = self.value_proj(value)
        if value_padding_mask is not None:
            values = values.masked_fill(value_padding_mask[..., None], 0.0)
        values = values.view(batch, value.shape[1], *head_shape)
        offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.num_heads, self.num_levels, self.num_points, 2
        )
        locations = deformable_sampling_locations(reference_points, offsets, spatial_shapes)
        output, weights = key_aware_deformable_attention(
            self.query_proj(query).view(batch, num_queries, *head_shape),
            values,  # the keys are the projected values
            values,
            spatial_shapes,
            level_start_index,
            locations,
            level_shapes=level_shapes,
        )
        output = self.output_proj(output)
        if return_sampling:
            return output, locations, weights
        return output
