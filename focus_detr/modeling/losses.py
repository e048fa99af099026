"""Box geometry and loss terms shared by the Hungarian matcher and the set criterion."""

from typing import Optional

import torch
from torchvision.ops import box_convert, sigmoid_focal_loss

__all__ = [
    "box_cxcywh_to_xyxy",
    "generalized_box_iou_pairwise",
    "generalized_box_iou_elementwise",
    "focal_loss_sum",
]


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) ``(cx, cy, w, h)`` -> (..., 4) ``(x0, y0, x1, y1)``."""
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def _generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float) -> torch.Tensor:
    """GIoU of two broadcastable (..., 4) xyxy box tensors."""
    wh1 = (boxes1[..., 2:] - boxes1[..., :2]).clamp(min=0)
    wh2 = (boxes2[..., 2:] - boxes2[..., :2]).clamp(min=0)
    area1 = wh1[..., 0] * wh1[..., 1]
    area2 = wh2[..., 0] * wh2[..., 1]
    inter_lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    inter_rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    inter_wh = (inter_rb - inter_lt).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = area1 + area2 - inter
    hull_lt = torch.minimum(boxes1[..., :2], boxes2[..., :2])
    hull_rb = torch.maximum(boxes1[..., 2:], boxes2[..., 2:])
    hull_wh = (hull_rb - hull_lt).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    # torchvision divides by the raw union and hull: two zero-area boxes (a degenerate ground
    # truth, or a predicted box collapsed by the sigmoid) then give 0 / 0 = NaN.
    iou = inter / union.clamp(min=eps)
    return iou - (hull - union) / hull.clamp(min=eps)


def generalized_box_iou_pairwise(
    boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7
) -> torch.Tensor:
    """
    Generalized IoU of every pair, finite even for zero-area boxes.

    Args:
        boxes1: (N, 4) xyxy boxes.
        boxes2: (M, 4) xyxy boxes.
        eps: lower bound of the union and hull areas in the divisions.

    Returns:
        (N, M) GIoU in [-1, 1].
    """
    return _generalized_box_iou(boxes1[:, None, :], boxes2[None, :, :], eps)


def generalized_box_iou_elementwise(
    boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7
) -> torch.Tensor:
    """
    Generalized IoU of matching rows, finite even for zero-area boxes.

    Args:
        boxes1: (N, 4) xyxy boxes.
        boxes2: (N, 4) xyxy boxes.
        eps: lower bound of the union and hull areas in the divisions.

    Returns:
        (N,) GIoU in [-1, 1].
    """
    if boxes1.shape != boxes2.shape:
        raise ValueError(
            f"boxes1 and boxes2 must have the same shape, got {tuple(boxes1.shape)} and "
            f"{tuple(boxes2.shape)}"
        )
    return _generalized_box_iou(boxes1, boxes2, eps)


def focal_loss_sum(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float,
    gamma: float,
    valid_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """
    Sigmoid focal loss summed over queries and classes (the caller divides by the box count).

    Args:
        logits: (B, Q, K) class logits.
        targets: (B, Q, K) one-hot targets (all zero = background).
        alpha: weight of the positive term.
        gamma: focusing exponent.
        valid_mask: optional (B, Q) bool; queries where it is False contribute nothing.

    Returns:
        Scalar loss.
    """
    loss = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
    if valid_mask is not None:
        loss = loss * valid_mask[..., None].to(loss.dtype)
    return loss.sum()
