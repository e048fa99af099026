"""Box coordinates in logit space, as the DETR family refines them, and the GIoU loss."""

import torch

__all__ = ["generalized_box_iou_loss", "inverse_sigmoid"]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """
    The logit of ``x`` clamped to [0, 1], with numerator and denominator each clamped to at least
    ``eps`` (1e-3, as the reference DETRs). Not ``torch.logit(x, eps)``: that clamps ``x`` itself
    to ``[eps, 1 - eps]`` and differs from the reference for ``x < eps`` or ``x > 1 - eps``
    (e.g. 0 gives log(1e-3 / 1) here and log(1e-3 / 0.999) there).

    Args:
        x: (...) values, usually sigmoid-space box coordinates.
        eps: lower bound of ``x`` and ``1 - x`` inside the logarithm.

    Returns:
        (...) tensor of the same shape and dtype.
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def generalized_box_iou_loss(
    boxes1: torch.Tensor, boxes2: torch.Tensor, reduction: str = "none", eps: float = 1e-7
) -> torch.Tensor:
    """
    ``1 - GIoU`` of paired XYXY boxes: the formula of ``torchvision.ops.generalized_box_iou_loss``
    (same values and gradients, ``eps`` in the union and hull areas keeps degenerate boxes
    finite), with the intersection of disjoint boxes zeroed by ``torch.where`` instead of a
    boolean-mask assignment, whose data-dependent size waits for the device.

    Args:
        boxes1, boxes2: (..., 4) XYXY boxes of the same shape.
        reduction: "none" (..., ), "mean" or "sum" (scalar).
        eps: added to the union and to the enclosing box's area.

    Returns:
        The losses, reduced as asked.
    """
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    # float32 unless float64, against overflows in the products (as torchvision)
    if boxes1.dtype not in (torch.float32, torch.float64):
        boxes1 = boxes1.float()
    if boxes2.dtype not in (torch.float32, torch.float64):
        boxes2 = boxes2.float()
    x1, y1, x2, y2 = boxes1.unbind(dim=-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(dim=-1)
    inter_x1, inter_y1 = torch.max(x1, x1g), torch.max(y1, y1g)
    inter_x2, inter_y2 = torch.min(x2, x2g), torch.min(y2, y2g)
    overlaps = (inter_y2 > inter_y1) & (inter_x2 > inter_x1)
    intersection = torch.where(overlaps, (inter_x2 - inter_x1) * (inter_y2 - inter_y1), 0.0)
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - intersection
    iou = intersection / (union + eps)
    hull = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    loss = 1 - (iou - ((hull - union) / (hull + eps)))
    if reduction == "mean":
        return loss.mean() if loss.numel() > 0 else 0.0 * loss.sum()
    if reduction == "sum":
        return loss.sum()
    return loss
