"""One-to-one assignment of predictions to ground-truth boxes (focal class cost, L1, GIoU)."""

from typing import Dict, List, Optional, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert

from .box_ops import generalized_box_iou_loss

__all__ = ["HungarianMatcher"]

# added to the cost of predictions that must not be matched while valid ones remain (the
# matching costs themselves are O(10))
_INVALID_COST = 1e6


class HungarianMatcher(nn.Module):
    """
    Matches every ground-truth box of an image to exactly one prediction by minimising

        cost_class * focal_cost + cost_bbox * L1(cxcywh) - cost_giou * GIoU(xyxy)

    with the Hungarian algorithm. Predictions left unmatched are background.
    """

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        """
        Args:
            cost_class: weight of the focal classification cost.
            cost_bbox: weight of the L1 distance between normalized cxcywh boxes.
            cost_giou: weight of the negative generalized IoU.
            focal_alpha: alpha of the focal cost (the same as the focal loss).
            focal_gamma: gamma of the focal cost.
        """
        super().__init__()
        for name, value in (
            ("cost_class", cost_class),
            ("cost_bbox", cost_bbox),
            ("cost_giou", cost_giou),
            ("focal_gamma", focal_gamma),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("at least one of cost_class, cost_bbox, cost_giou must be non-zero")
        if not 0.0 <= focal_alpha <= 1.0:
            raise ValueError(f"focal_alpha must be in [0, 1], got {focal_alpha}")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def cost_matrix(
        self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, target: Dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """
        Matching cost of one image.

        Args:
            pred_logits: (Q, K) class logits.
            pred_boxes: (Q, 4) normalized cxcywh boxes.
            target: dict with "labels" (M,) int64 and "boxes" (M, 4) normalized cxcywh.

        Returns:
            (Q, M) cost.
        """
        labels = target["labels"]
        tgt_boxes = target["boxes"].to(pred_boxes.dtype)
        prob = pred_logits.float().sigmoid()[:, labels]
        # the focal loss of calling the prediction this class minus that of calling it background
        eps = 1e-8
        pos = self.focal_alpha * (1 - prob).pow(self.focal_gamma) * -(prob + eps).log()
        neg = (1 - self.focal_alpha) * prob.pow(self.focal_gamma) * -(1 - prob + eps).log()
        class_cost = pos - neg
        bbox_cost = torch.cdist(pred_boxes.float(), tgt_boxes.float(), p=1)
        # every pair through torchvision's GIoU loss, whose eps keeps degenerate (zero-area)
        # boxes finite; (Q, 1, 4) against (1, M, 4)
        pred_xyxy = box_convert(pred_boxes.float(), "cxcywh", "xyxy")[:, None, :]
        tgt_xyxy = box_convert(tgt_boxes.float(), "cxcywh", "xyxy")[None, :, :]
        pred_xyxy, tgt_xyxy = torch.broadcast_tensors(pred_xyxy, tgt_xyxy)
        giou = 1.0 - generalized_box_iou_loss(pred_xyxy, tgt_xyxy, reduction="none")
        return self.cost_class * class_cost + self.cost_bbox * bbox_cost - self.cost_giou * giou

    @torch.no_grad()
    def forward(
        self,
        pred_logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        targets: List[Dict[str, torch.Tensor]],
        valid_mask: Optional[torch.Tensor] = None,
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            pred_logits: (B, Q, K) class logits.
            pred_boxes: (B, Q, 4) normalized cxcywh boxes.
            targets: B dicts with "labels" (M_i,) int64 and "boxes" (M_i, 4) normalized cxcywh.
            valid_mask: optional (B, Q) bool; predictions where it is False are matched only
                when an image has fewer valid predictions than boxes.

        Returns:
            B pairs ``(pred_idx, tgt_idx)`` of int64 tensors of length min(Q, M_i) on the
            predictions' device: prediction ``pred_idx[j]`` is assigned ground truth ``tgt_idx[j]``.
        """
        if pred_logits.shape[:2] != pred_boxes.shape[:2] or len(targets) != pred_logits.shape[0]:
            raise ValueError(
                f"inconsistent inputs: pred_logits {tuple(pred_logits.shape)}, pred_boxes "
                f"{tuple(pred_boxes.shape)}, {len(targets)} targets"
            )
        device = pred_logits.device
        batch, num_queries = pred_logits.shape[:2]
        sizes = [int(target["labels"].numel()) for target in targets]
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        if sum(sizes) == 0:
            return [(empty, empty.clone()) for _ in targets]
        # one cost matrix for the whole batch (every prediction against every box), split per
        # image afterwards: a few large ops instead of many small ones
        all_targets = {
            "labels": torch.cat([target["labels"] for target in targets]).to(device),
            "boxes": torch.cat([target["boxes"] for target in targets]).to(device),
        }
        cost = self.cost_matrix(pred_logits.flatten(0, 1), pred_boxes.flatten(0, 1), all_targets)
        cost = cost.view(batch, num_queries, -1)
        if valid_mask is not None:
            cost = cost + (~valid_mask).to(cost.dtype)[..., None] * _INVALID_COST
        # the one read of the device: scipy assigns on the CPU
        cost = cost.cpu()
        if not torch.isfinite(cost).all():
            raise ValueError("the matching cost has NaN or inf entries (non-finite predictions?)")
        indices = []
        for image, image_cost in enumerate(cost.split(sizes, dim=-1)):
            if sizes[image] == 0:
                indices.append((empty, empty.clone()))
                continue
            pred_idx, tgt_idx = linear_sum_assignment(image_cost[image].numpy())
            indices.append(
                (
                    torch.as_tensor(pred_idx, dtype=torch.int64, device=device),
                    torch.as_tensor(tgt_idx, dtype=torch.int64, device=device),
                )
            )
        return indices

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
            f"cost_giou={self.cost_giou}, focal_alpha={self.focal_alpha}, "
            f"focal_gamma={self.focal_gamma}"
        )
