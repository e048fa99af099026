"""FCOS-style binary foreground targets for the token selector, and its focal loss."""

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchvision.ops import sigmoid_focal_loss

__all__ = [
    "REFERENCE_SIZE_RANGES",
    "default_size_ranges",
    "overlapping_size_ranges",
    "validate_size_ranges",
    "compute_foreground_targets",
    "foreground_loss",
    "ForegroundLoss",
]

# (lo, hi] of max(l, t, r, b) in input pixels, finest level first (Focus-DETR / FCOS reference)
REFERENCE_SIZE_RANGES: Tuple[Tuple[float, float], ...] = (
    (-1.0, 64.0),
    (64.0, 128.0),
    (128.0, 256.0),
    (256.0, math.inf),
)


def overlapping_size_ranges(
    ranges: Sequence[Tuple[float, float]] = REFERENCE_SIZE_RANGES, overlap: float = 0.5
) -> List[Tuple[float, float]]:
    """
    The paper's variant where adjacent ranges overlap: every positive lower bound is lowered to
    ``lo * (1 - overlap)``; upper bounds and non-positive lower bounds are kept.

    With the reference ranges and ``overlap=0.5`` this gives (-1, 64], (32, 128], (64, 256],
    (128, inf): every finite range spans two octaves and shares one octave (half of it on a log2
    scale) with each neighbour, so an object of size in (32, 64] is positive on levels 0 and 1.

    Args:
        ranges: non-overlapping (lo, hi] ranges, finest level first.
        overlap: in [0, 1); 0 returns the ranges unchanged.

    Returns:
        list of (lo, hi) pairs, one per level.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    return [(lo * (1.0 - overlap) if lo > 0 else lo, hi) for lo, hi in ranges]


def validate_size_ranges(
    ranges: Sequence[Tuple[float, float]], num_levels: int
) -> List[Tuple[float, float]]:
    """Checks one (lo, hi) pair per level with lo < hi; returns them as floats."""
    ranges = [tuple(pair) for pair in ranges]
    if len(ranges) != num_levels:
        raise ValueError(
            f"need one size range per level ({num_levels}), got {len(ranges)}: {ranges}"
        )
    for pair in ranges:
        if len(pair) != 2 or not float(pair[0]) < float(pair[1]):
            raise ValueError(f"every size range must be a pair (lo, hi) with lo < hi, got {pair}")
    return [(float(lo), float(hi)) for lo, hi in ranges]


def default_size_ranges(num_levels: int) -> List[Tuple[float, float]]:
    """
    The reference's (-1, 64], (64, 128], (128, 256], (256, inf) for 4 levels; for other level
    counts level l covers up to ``64 * 2^l`` and the last level is unbounded.
    """
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}")
    bounds = [-1.0] + [64.0 * 2**level for level in range(num_levels - 1)] + [math.inf]
    return list(zip(bounds[:-1], bounds[1:]))


def _validate_strides(strides: Sequence[int], num_levels: int) -> List[int]:
    strides = list(strides)
    if len(strides) != num_levels or any(int(s) != s or s <= 0 for s in strides):
        raise ValueError(
            f"need one positive integer stride per level ({num_levels}), got {strides}"
        )
    return [int(s) for s in strides]


@torch.no_grad()
def _level_targets(
    boxes: torch.Tensor,
    height: int,
    width: int,
    stride: int,
    size_range: Tuple[float, float],
    max_elements: int,
) -> torch.Tensor:
    """
    (B, h * w) bool: locations of one level positive for at least one box of their image.

    Args:
        boxes: (B, M, 4) absolute xyxy boxes; all-zero rows are padding (never positive: a
            location is never strictly inside a zero-size box).
    """
    batch, num_boxes, _ = boxes.shape
    device = boxes.device
    centres_x = torch.arange(width, device=device, dtype=boxes.dtype) * stride + stride // 2
    centres_y = torch.arange(height, device=device, dtype=boxes.dtype) * stride + stride // 2
    positive = torch.zeros(batch, height, width, dtype=torch.bool, device=device)
    lo, hi = size_range
    # only (B, chunk, h, w) values exist at once
    chunk = max(1, max_elements // max(1, batch * height * width))
    for part in boxes.split(chunk, dim=1):
        # distances are separable in x and y: (B, m, w) and (B, m, h) instead of (B, m, h*w, 4)
        left = centres_x[None, None, :] - part[..., 0:1]
        right = part[..., 2:3] - centres_x[None, None, :]
        top = centres_y[None, None, :] - part[..., 1:2]
        bottom = part[..., 3:4] - centres_y[None, None, :]
        min_x, max_x = torch.minimum(left, right), torch.maximum(left, right)
        min_y, max_y = torch.minimum(top, bottom), torch.maximum(top, bottom)
        inside = torch.minimum(min_y[..., :, None], min_x[..., None, :]) > 0
        extent = torch.maximum(max_y[..., :, None], max_x[..., None, :])
        in_range = (extent > lo) & (extent <= hi)
        positive |= (inside & in_range).any(dim=1)
    return positive.flatten(1)


@torch.no_grad()
def compute_foreground_targets(
    boxes_xyxy: Sequence[torch.Tensor],
    level_shapes: Sequence[Tuple[int, int]],
    strides: Sequence[int],
    ranges: Sequence[Tuple[float, float]] = REFERENCE_SIZE_RANGES,
    *,
    device: Optional[torch.device] = None,
    max_elements: int = 1 << 22,
) -> torch.Tensor:
    """
    Binary FCOS-style targets. The location (i, j) of level l (stride s) sits at
    ``(j * s + s // 2, i * s + s // 2)`` of the padded input; it is positive for a box if it lies
    strictly inside it (``min(l, t, r, b) > 0``) and ``lo_l < max(l, t, r, b) <= hi_l``.

    All images of the batch are handled at once (boxes padded to the largest count); memory stays
    bounded for crowded images because boxes are processed in chunks so that no temporary holds
    more than about ``max_elements`` values.

    Args:
        boxes_xyxy: one (M_i, 4) tensor per image, absolute (x0, y0, x1, y1) in the resized input
            image; M_i may be 0.
        level_shapes: L pairs (h, w) of every level, finest first.
        strides: L positive integers, the input pixels per cell of every level.
        ranges: L pairs (lo, hi], finest level first; see :data:`REFERENCE_SIZE_RANGES` and
            :func:`overlapping_size_ranges`.
        device: where the targets are built (default: the boxes' device, else the CPU).
        max_elements: bound of the largest temporary.

    Returns:
        (B, N) float targets in {0, 1}, N = sum of h * w, flattened level after level like the
        tokens.
    """
    num_levels = len(level_shapes)
    ranges = validate_size_ranges(ranges, num_levels)
    strides = _validate_strides(strides, num_levels)
    if max_elements <= 0:
        raise ValueError(f"max_elements must be positive, got {max_elements}")
    for image, boxes in enumerate(boxes_xyxy):
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"boxes of image {image} must have shape (M, 4), got {boxes.shape}")
    if device is None:
        device = boxes_xyxy[0].device if len(boxes_xyxy) > 0 else torch.device("cpu")
    num_tokens = sum(h * w for h, w in level_shapes)
    batch = len(boxes_xyxy)
    max_boxes = max((int(boxes.shape[0]) for boxes in boxes_xyxy), default=0)
    if max_boxes == 0:
        return torch.zeros(batch, num_tokens, device=device)
    padded = torch.zeros(batch, max_boxes, 4, device=device)
    for image, boxes in enumerate(boxes_xyxy):
        padded[image, : boxes.shape[0]] = boxes.to(device=device, dtype=torch.float32)
    per_level = [
        _level_targets(padded, h, w, stride, size_range, max_elements)
        for (h, w), stride, size_range in zip(level_shapes, strides, ranges)
    ]
    return torch.cat(per_level, dim=1).float()


def foreground_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    padding_mask: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    *,
    include_padding: bool = False,
) -> torch.Tensor:
    """
    Sigmoid focal loss summed over the valid tokens of each image (every token with
    ``include_padding``), divided by that image's positive count among them (at least 1),
    averaged over the batch. Unweighted: the weight (1.5 in Focus-DETR) is applied by
    :class:`ForegroundLoss` or by the caller.

    Args:
        logits: (B, N) raw foreground logits.
        targets: (B, N) in {0, 1}.
        padding_mask: (B, N) bool, True on padded tokens (excluded unless ``include_padding``).
        alpha: focal loss positive-class weight.
        gamma: focal loss focusing exponent.
        include_padding: True (the reference): padded tokens count like image tokens, with
            their own logits and targets (zero: a location in the padding is never inside a
            box of the image), i.e. as negatives; an image's loss then depends on how much
            padding its batch adds. False: they are left out.

    Returns:
        scalar loss; finite for images without any box (all targets 0).
    """
    if logits.shape != targets.shape or logits.shape != padding_mask.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)} and padding_mask "
            f"{tuple(padding_mask.shape)} must have the same shape"
        )
    targets = targets.to(logits.dtype)
    if include_padding:
        per_token = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
        return (per_token.sum(dim=1) / targets.sum(dim=1).clamp(min=1.0)).mean()
    valid = ~padding_mask
    # where(): padded logits may hold any value, never let them reach the sum (0 * inf = nan)
    safe_logits = torch.where(valid, logits, torch.zeros_like(logits))
    per_token = sigmoid_focal_loss(safe_logits, targets, alpha=alpha, gamma=gamma, reduction="none")
    per_image = torch.where(valid, per_token, torch.zeros_like(per_token)).sum(dim=1)
    num_positive = (targets * valid).sum(dim=1).clamp(min=1.0)
    return (per_image / num_positive).mean()


class ForegroundLoss(nn.Module):
    """Targets + weighted :func:`foreground_loss` in one LazyConfig-friendly module."""

    def __init__(
        self,
        *,
        num_levels: int,
        ranges: Optional[Sequence[Tuple[float, float]]] = None,
        alpha: float = 0.25,
        gamma: float = 2.0,
        weight: float = 1.5,
        include_padding: bool = False,
    ):
        """
        Args:
            num_levels: feature levels.
            ranges: one (lo, hi] object-size range per level, finest first; default
                :func:`default_size_ranges` (the reference ranges for 4 levels).
            alpha: focal loss positive-class weight.
            gamma: focal loss focusing exponent.
            weight: multiplies the loss (Focus-DETR: 1.5).
            include_padding: padded tokens count as negatives (the reference), see
                :func:`foreground_loss`.
        """
        super().__init__()
        if ranges is None:
            ranges = default_size_ranges(num_levels)
        self.ranges = validate_size_ranges(ranges, num_levels)
        if alpha < 0 or alpha > 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.alpha = alpha
        self.gamma = gamma
        self.weight = weight
        self.include_padding = include_padding

    def targets(
        self,
        boxes_xyxy: Sequence[torch.Tensor],
        level_shapes: Sequence[Tuple[int, int]],
        strides: Sequence[int],
        device: Optional[torch.device] = None,
    ) -> torch.Tensor:
        """(B, N) binary targets of :func:`compute_foreground_targets` with this loss's ranges."""
        return compute_foreground_targets(
            boxes_xyxy, level_shapes, strides, self.ranges, device=device
        )

    def forward(
        self,
        foreground_logits: torch.Tensor,
        padding_mask: torch.Tensor,
        level_shapes: Sequence[Tuple[int, int]],
        strides: Sequence[int],
        boxes_xyxy: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """
        Args:
            foreground_logits: (B, N) raw logits (with ``include_padding``, padded tokens' too).
            padding_mask: (B, N) bool, True on padded tokens.
            level_shapes: L pairs (h, w) of every level.
            strides: L input pixels per cell.
            boxes_xyxy: one (M_i, 4) tensor per image, absolute xyxy in the resized input.

        Returns:
            scalar, ``weight * foreground_loss``.
        """
        targets = self.targets(boxes_xyxy, level_shapes, strides, foreground_logits.device)
        loss = foreground_loss(
            foreground_logits,
            targets,
            padding_mask,
            alpha=self.alpha,
            gamma=self.gamma,
            include_padding=self.include_padding,
        )
        return self.weight * loss
