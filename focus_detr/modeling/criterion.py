"""DETR set criterion with focal, L1 and GIoU losses over decoder, encoder and denoising outputs."""

from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from detectron2.utils import comm
from torch import nn
from torchvision.ops import box_convert, sigmoid_focal_loss

from .box_ops import generalized_box_iou_loss
from .denoising import DenoisingQueries
from .matcher import HungarianMatcher

__all__ = ["SetCriterion", "set_outputs"]

_BASE_LOSSES = ("loss_class", "loss_bbox", "loss_giou")
Indices = List[Tuple[torch.Tensor, torch.Tensor]]


def set_outputs(
    class_logits: torch.Tensor,
    boxes: torch.Tensor,
    *,
    enc_logits: Optional[torch.Tensor] = None,
    enc_boxes: Optional[torch.Tensor] = None,
    dn_outputs: Optional[List[Dict[str, torch.Tensor]]] = None,
) -> Dict[str, object]:
    """
    Arrange predictions the way :class:`SetCriterion` reads them.

    Args:
        class_logits: (D, B, Q, K) logits of the matching queries of every decoder layer.
        boxes: (D, B, Q, 4) their cxcywh boxes.
        enc_logits, enc_boxes: (B, Q, K) and (B, Q, 4) of the two-stage selection, or None.
        dn_outputs: D dicts of the denoising queries (``DenoisingQueries.split_outputs``).

    Returns:
        dict with "pred_logits" (B, Q, K) and "pred_boxes" (B, Q, 4) of the last layer,
        "aux_outputs" (D - 1 such dicts, first layer first), and "enc_outputs" / "dn_outputs"
        when given.
    """
    outputs: Dict[str, object] = {
        "pred_logits": class_logits[-1],
        "pred_boxes": boxes[-1],
        "aux_outputs": [
            {"pred_logits": logits, "pred_boxes": layer_boxes}
            for logits, layer_boxes in zip(class_logits[:-1], boxes[:-1])
        ],
    }
    if enc_logits is not None and enc_boxes is not None:
        outputs["enc_outputs"] = {"pred_logits": enc_logits, "pred_boxes": enc_boxes}
    if dn_outputs is not None:
        outputs["dn_outputs"] = dn_outputs
    return outputs


class SetCriterion(nn.Module):
    """
    Computes the weighted losses of every output set: sigmoid focal loss over all queries and
    classes, L1 and GIoU over the matched boxes, each divided by the number of ground-truth boxes
    in the (global) batch. The last decoder layer gives ``loss_class``..., earlier layers
    ``loss_class_0``..., the two-stage proposals ``loss_class_enc``..., the denoising queries
    ``loss_class_dn`` (last layer) and ``loss_class_dn_0``... (earlier layers).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: Optional[Mapping[str, float]] = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        denoising: bool = True,
    ):
        """
        Args:
            num_classes: K, object classes (no background class: all-zero targets).
            matcher: assigns predictions to ground truth.
            weight_dict: weights of "loss_class" (1.0), "loss_bbox" (5.0), "loss_giou" (2.0);
                a full name such as "loss_class_dn" overrides the base weight for that term.
            focal_alpha: alpha of the focal loss.
            focal_gamma: gamma of the focal loss.
            denoising: whether the model uses denoising queries. Then the DN loss keys are
                always returned (zero when a batch gives no DN queries) so that every process
                reports the same keys.
        """
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if not 0.0 <= focal_alpha <= 1.0:
            raise ValueError(f"focal_alpha must be in [0, 1], got {focal_alpha}")
        if focal_gamma < 0:
            raise ValueError(f"focal_gamma must be >= 0, got {focal_gamma}")
        weights = {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
        for name, value in (weight_dict or {}).items():
            if not name.startswith(_BASE_LOSSES):
                raise ValueError(f"unknown loss {name!r} in weight_dict; known: {_BASE_LOSSES}")
            weights[name] = float(value)
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weights
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.denoising = denoising

    def weight(self, name: str) -> float:
        """Weight of a loss key: its own entry, else that of its base loss."""
        if name in self.weight_dict:
            return self.weight_dict[name]
        return self.weight_dict[next(base for base in _BASE_LOSSES if name.startswith(base))]

    @staticmethod
    def num_boxes(targets: List[Dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
        """Average number of ground-truth boxes per process, at least 1 (scalar float tensor)."""
        # a fill, not a copy from the host: the device does not wait for it
        count = torch.full(
            (), float(sum(t["labels"].numel() for t in targets)), dtype=torch.float32, device=device
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
        return (count / comm.get_world_size()).clamp(min=1.0)

    def set_losses(
        self,
        pred_logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        targets: List[Dict[str, torch.Tensor]],
        indices: Indices,
        normalizer: torch.Tensor,
        valid_mask: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Unweighted losses of one output set.

        Args:
            pred_logits: (B, Q, K) logits.
            pred_boxes: (B, Q, 4) cxcywh boxes.
            targets: B dicts with "labels" (M_i,) and "boxes" (M_i, 4).
            indices: B pairs (pred_idx, tgt_idx); matched queries are positives, others background.
            normalizer: scalar divisor of every loss.
            valid_mask: (B, Q) bool; queries where it is False get no class loss.

        Returns:
            dict with "loss_class", "loss_bbox", "loss_giou" scalars.
        """
        batch_idx = torch.cat([torch.full_like(pred, i) for i, (pred, _) in enumerate(indices)])
        pred_idx = torch.cat([pred for pred, _ in indices])
        labels = torch.cat(
            [t["labels"][tgt].to(pred_logits.device) for t, (_, tgt) in zip(targets, indices)]
        )
        tgt_boxes = torch.cat(
            [t["boxes"][tgt].to(pred_boxes) for t, (_, tgt) in zip(targets, indices)]
        )
        onehot = torch.zeros_like(pred_logits)
        onehot[batch_idx, pred_idx, labels] = 1.0
        loss_class = sigmoid_focal_loss(
            pred_logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none"
        )
        if valid_mask is not None:
            loss_class = loss_class * valid_mask[..., None].to(loss_class.dtype)
        loss_class = loss_class.sum()
        if pred_idx.numel() == 0:
            # nothing to regress; keep the boxes in the graph (DDP expects every parameter used)
            zero = pred_boxes.sum() * 0.0
            return {"loss_class": loss_class / normalizer, "loss_bbox": zero, "loss_giou": zero}
        matched = pred_boxes[batch_idx, pred_idx]
        loss_bbox = (matched - tgt_boxes).abs().sum()
        # finite for degenerate boxes: torchvision adds eps to the union and hull areas
        loss_giou = generalized_box_iou_loss(
            box_convert(matched, "cxcywh", "xyxy"),
            box_convert(tgt_boxes, "cxcywh", "xyxy"),
            reduction="sum",
        )
        return {
            "loss_class": loss_class / normalizer,
            "loss_bbox": loss_bbox / normalizer,
            "loss_giou": loss_giou / normalizer,
        }

    def matched_losses(
        self,
        pred_logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        targets: List[Dict[str, torch.Tensor]],
        *,
        suffix: str = "",
        num_boxes: Optional[torch.Tensor] = None,
        valid_mask: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Hungarian-match one output set to the targets and return its WEIGHTED losses, named
        ``loss_class{suffix}``, ``loss_bbox{suffix}``, ``loss_giou{suffix}``. Encoders with
        auxiliary detection heads (Sparse DETR) use it.

        Args:
            pred_logits: (B, Q, K) logits.
            pred_boxes: (B, Q, 4) cxcywh boxes.
            targets: B dicts with "labels" (M_i,) and "boxes" (M_i, 4).
            suffix: appended to the loss names, e.g. "_enc_aux_0".
            num_boxes: normalizer; default :meth:`num_boxes` of the targets.
            valid_mask: optional (B, Q) bool: predictions where it is False get no class loss
                and are matched only when an image has fewer valid predictions than boxes.
        """
        if num_boxes is None:
            num_boxes = self.num_boxes(targets, pred_logits.device)
        indices = self.matcher(pred_logits, pred_boxes, targets, valid_mask)
        losses = self.set_losses(
            pred_logits, pred_boxes, targets, indices, num_boxes, valid_mask=valid_mask
        )
        return {name + suffix: value * self.weight(name + suffix) for name, value in losses.items()}

    def forward(
        self,
        outputs: Mapping[str, object],
        targets: List[Dict[str, torch.Tensor]],
        dn_meta: Optional[DenoisingQueries] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: "pred_logits" (B, Q, K) and "pred_boxes" (B, Q, 4) of the last decoder
                layer, "aux_outputs" (list of such dicts, earlier layers first), optional
                "enc_outputs" (dict of the two-stage selection) and "dn_outputs" (list of D dicts
                with (B, pad_size, K) / (B, pad_size, 4)).
            targets: B dicts with "labels" (M_i,) int64 and "boxes" (M_i, 4) normalized cxcywh.
            dn_meta: the batch's :class:`DenoisingQueries`, or None when it had none.

        Returns:
            dict of weighted scalar losses.
        """
        device = outputs["pred_logits"].device
        num_boxes = self.num_boxes(targets, device)
        aux_outputs = list(outputs.get("aux_outputs") or [])
        losses: Dict[str, torch.Tensor] = {}
        output_sets = [("", outputs)]
        output_sets += [(f"_{layer}", aux) for layer, aux in enumerate(aux_outputs)]
        if outputs.get("enc_outputs") is not None:
            output_sets.append(("_enc", outputs["enc_outputs"]))
        for suffix, output in output_sets:
            losses.update(
                self.matched_losses(
                    output["pred_logits"],
                    output["pred_boxes"],
                    targets,
                    suffix=suffix,
                    num_boxes=num_boxes,
                )
            )
        raw: Dict[str, torch.Tensor] = {}

        dn_outputs = outputs.get("dn_outputs")
        if (dn_meta is None) != (dn_outputs is None):
            raise ValueError(
                "dn_meta and outputs['dn_outputs'] must be given together, got "
                f"dn_meta={'None' if dn_meta is None else 'set'}, "
                f"dn_outputs={'None' if dn_outputs is None else 'set'}"
            )
        num_layers = len(aux_outputs) + 1
        if dn_meta is not None:
            if len(dn_outputs) != num_layers:
                raise ValueError(
                    f"expected {num_layers} dn_outputs (one per decoder layer), got "
                    f"{len(dn_outputs)}"
                )
            normalizer = num_boxes * dn_meta.num_groups
            for layer, dn in enumerate(dn_outputs):
                suffix = "_dn" if layer == num_layers - 1 else f"_dn_{layer}"
                layer_losses = self.set_losses(
                    dn["pred_logits"],
                    dn["pred_boxes"],
                    targets,
                    dn_meta.positive_indices,
                    normalizer,
                    valid_mask=~dn_meta.slot_padding_mask,
                )
                for name, value in layer_losses.items():
                    raw[name + suffix] = value
        elif self.denoising:
            # no DN queries this batch: same keys as the other processes, connected to the graph
            zero = outputs["pred_logits"].sum() * 0.0 + outputs["pred_boxes"].sum() * 0.0
            for layer in range(num_layers):
                suffix = "_dn" if layer == num_layers - 1 else f"_dn_{layer}"
                for name in _BASE_LOSSES:
                    raw[name + suffix] = zero

        losses.update({name: value * self.weight(name) for name, value in raw.items()})
        return losses

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, weight_dict={self.weight_dict}, "
            f"focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}, "
            f"denoising={self.denoising}"
        )
