"""Sparse DETR's decoder cross-attention map (DAM): where the decoder looked, on the token grid."""

from typing import Sequence, Tuple

import torch

from ..structures import int64_tensor

__all__ = ["decoder_attention_map", "top_tokens_target"]

_ALIGNMENTS = ("sampling", "reference")


@torch.no_grad()
def decoder_attention_map(
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    level_shapes: Sequence[Tuple[int, int]],
    *,
    alignment: str = "reference",
) -> torch.Tensor:
    """
    Splat every decoder sampling point's attention weight bilinearly onto the flattened
    multi-scale token grid and sum over decoder layers, queries, heads and points.

    Args:
        sampling_locations: (D, B, Q, H, L, P, 2) normalized (x, y) on the padded grid of every
            level (``DecoderOutput.sampling_locations``).
        attention_weights: (D, B, Q, H, L, P) their weights.
        level_shapes: L pairs (h, w), finest first.
        alignment: "reference" (default, Sparse DETR's ``util/dam.py``): the cell
            coordinate is ``x = loc_x * w`` (cell j spans [j, j + 1) but is treated as sitting
            at j), i.e. half a cell to the bottom-right of where the deformable attention reads;
            "sampling": a location is split over the four cells whose centres surround it,
            ``x = loc_x * w - 0.5`` as the deformable attention samples
            (``align_corners=False``), so a token receives the weight of the values read from
            it.

    Returns:
        (B, N) float32 attention mass of every token (no gradient).
    """
    if alignment not in _ALIGNMENTS:
        raise ValueError(f"alignment must be one of {_ALIGNMENTS}, got {alignment!r}")
    num_layers, batch, queries, heads, levels, points, _ = sampling_locations.shape
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"attention_weights {tuple(attention_weights.shape)} do not match "
            f"sampling_locations {tuple(sampling_locations.shape)}"
        )
    if levels != len(level_shapes):
        raise ValueError(f"{levels} levels sampled but level shapes {list(level_shapes)}")
    # (B, D * Q * H * P, L, 2) and (B, D * Q * H * P, L)
    locations = (
        sampling_locations.float().permute(1, 0, 2, 3, 5, 4, 6).reshape(batch, -1, levels, 2)
    )
    weights = attention_weights.float().permute(1, 0, 2, 3, 5, 4).reshape(batch, -1, levels)
    offset = 0.5 if alignment == "sampling" else 0.0
    total = sum(h * w for h, w in level_shapes)
    grid = locations.new_zeros(batch, total)
    start = 0
    for level, (height, width) in enumerate(level_shapes):
        x = locations[:, :, level, 0] * width - offset
        y = locations[:, :, level, 1] * height - offset
        weight = weights[:, :, level]
        finite = torch.isfinite(x) & torch.isfinite(y) & torch.isfinite(weight)
        x, y = torch.where(finite, x, -2.0), torch.where(finite, y, -2.0)
        weight = torch.where(finite, weight, 0.0)
        x0, y0 = x.floor(), y.floor()
        for dx in (0, 1):
            for dy in (0, 1):
                cx, cy = x0 + dx, y0 + dy
                share = (1 - (x - cx).abs()) * (1 - (y - cy).abs())
                inside = (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
                index = (cy.clamp(0, height - 1) * width + cx.clamp(0, width - 1)).long() + start
                grid.scatter_add_(1, index, torch.where(inside, share * weight, 0.0))
        start += height * width
    return grid


@torch.no_grad()
def top_tokens_target(
    attention_map: torch.Tensor, padding_mask: torch.Tensor, counts: Sequence[int]
) -> torch.Tensor:
    """
    Sparse DETR's binary target: the ``counts[i]`` valid tokens of image i with the largest
    attention mass are 1, the others 0.

    Args:
        attention_map: (B, N) attention mass.
        padding_mask: (B, N) bool, True on padding (never a target).
        counts: B Python ints, tokens per image (no tensor is read back).

    Returns:
        (B, N) float targets in {0, 1}.
    """
    # padded cells below every other, as Sparse DETR's code fills them (min - 1)
    ranking = attention_map.masked_fill(padding_mask, attention_map.min() - 1)
    max_count = max(counts, default=0)
    target = torch.zeros_like(attention_map)
    if max_count == 0:
        return target
    order = ranking.topk(min(max_count, ranking.shape[1]), dim=1).indices
    count_tensor = int64_tensor(counts, order.device)
    keep = torch.arange(order.shape[1], device=order.device)[None, :] < count_tensor[:, None]
    keep &= ~padding_mask.gather(1, order)
    return target.scatter(1, order, keep.to(target.dtype))
