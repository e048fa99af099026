"""Padding masks, flattening and reference points of multi-scale feature maps."""

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

__all__ = ["FlattenedFeatures", "level_padding_masks", "flatten_levels", "encoder_reference_points"]


@dataclass
class FlattenedFeatures:
    """Multi-scale maps flattened level after level (row-major inside a level)."""

    tokens: torch.Tensor  # (B, N, C)
    token_pos: torch.Tensor  # (B, N, C) position + level embedding
    padding_mask: torch.Tensor  # (B, N) bool, True = padding
    spatial_shapes: torch.Tensor  # (L, 2) int64 (h, w)
    level_start_index: torch.Tensor  # (L,) int64
    valid_ratios: torch.Tensor  # (B, L, 2) (valid_w / w, valid_h / h)


def level_padding_masks(
    image_sizes: Sequence[Tuple[int, int]],
    padded_size: Tuple[int, int],
    feature_sizes: Sequence[Tuple[int, int]],
    device: torch.device,
) -> List[torch.Tensor]:
    """
    Padding masks of every level, from the image sizes (used in training AND inference).

    Args:
        image_sizes: (h, w) of every image before padding.
        padded_size: (H, W) of the padded batch tensor.
        feature_sizes: (h_l, w_l) of every level.

    Returns:
        One (B, h_l, w_l) bool tensor per level, True on padding. A feature cell is valid when
        its receptive area starts inside the image: cell j is valid iff j < ceil(w * w_l / W).
    """
    pad_h, pad_w = padded_size
    sizes = torch.as_tensor(image_sizes, dtype=torch.float64, device=device).view(-1, 2)
    masks = []
    for height, width in feature_sizes:
        valid_h = torch.ceil(sizes[:, 0] * height / pad_h).clamp(min=1)
        valid_w = torch.ceil(sizes[:, 1] * width / pad_w).clamp(min=1)
        rows = torch.arange(height, device=device, dtype=torch.float64)
        cols = torch.arange(width, device=device, dtype=torch.float64)
        masks.append(
            (rows[None, :, None] >= valid_h[:, None, None])
            | (cols[None, None, :] >= valid_w[:, None, None])
        )
    return masks


def flatten_levels(
    features: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    positions: Sequence[torch.Tensor],
    level_embed: torch.Tensor,
) -> FlattenedFeatures:
    """
    Args:
        features: L tensors (B, C, h_l, w_l).
        masks: L bool tensors (B, h_l, w_l), True on padding.
        positions: L position embeddings (B, C, h_l, w_l).
        level_embed: (L, C) learned level embedding.
    """
    device = features[0].device
    shapes = [feature.shape[-2:] for feature in features]
    spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device).view(-1, 2)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat((areas.new_zeros(1), areas.cumsum(0)[:-1]))
    tokens = torch.cat([feature.flatten(2).transpose(1, 2) for feature in features], dim=1)
    token_pos = torch.cat(
        [
            pos.flatten(2).transpose(1, 2) + level_embed[level].view(1, 1, -1)
            for level, pos in enumerate(positions)
        ],
        dim=1,
    )
    padding_mask = torch.cat([mask.flatten(1) for mask in masks], dim=1)
    valid_ratios = torch.stack([_valid_ratio(mask) for mask in masks], dim=1)
    return FlattenedFeatures(
        tokens=tokens,
        token_pos=token_pos,
        padding_mask=padding_mask,
        spatial_shapes=spatial_shapes,
        level_start_index=level_start_index,
        valid_ratios=valid_ratios.to(tokens.dtype),
    )


def _valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """(B, h, w) padding mask -> (B, 2) (valid_w / w, valid_h / h)."""
    _, height, width = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float()
    valid_w = (~mask[:, 0, :]).sum(1).float()
    return torch.stack([valid_w / width, valid_h / height], dim=-1)


def encoder_reference_points(
    spatial_shapes: torch.Tensor, valid_ratios: torch.Tensor
) -> torch.Tensor:
    """
    Cell centres of every level normalized by the valid size, then expressed on every level.

    Args:
        spatial_shapes: (L, 2) int64 (h, w).
        valid_ratios: (B, L, 2).

    Returns:
        (B, N, L, 2) normalized (x, y) reference points.
    """
    points = []
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        ys, xs = torch.meshgrid(
            torch.arange(height, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
            torch.arange(width, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
            indexing="ij",
        )
        ys = ys.reshape(1, -1) / (valid_ratios[:, None, level, 1] * height)
        xs = xs.reshape(1, -1) / (valid_ratios[:, None, level, 0] * width)
        points.append(torch.stack((xs, ys), dim=-1))
    reference = torch.cat(points, dim=1)
    return reference[:, :, None] * valid_ratios[:, None]
