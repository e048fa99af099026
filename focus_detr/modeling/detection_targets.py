"""Ground truth in the forms the losses need, and predictions back to detectron2 Instances."""

from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.structures import Boxes, Instances
from torchvision.ops import box_convert

__all__ = ["instances_to_targets", "predictions_to_instances"]


def instances_to_targets(
    instances: Sequence[Instances], image_sizes: Sequence[Tuple[int, int]]
) -> List[Dict[str, torch.Tensor]]:
    """
    Args:
        instances: per image, ``gt_boxes`` (absolute XYXY in the resized image) and ``gt_classes``.
        image_sizes: (h, w) of every resized, unpadded image.

    Returns:
        Per image a dict with ``labels`` (M,) int64, ``boxes`` (M, 4) cxcywh normalized by the
        image size, and ``boxes_xyxy`` (M, 4) absolute XYXY. Boxes are clipped to the image and
        degenerate ones (zero width or height after clipping) are dropped: they have no
        foreground location and would make GIoU undefined.
    """
    targets = []
    for per_image, (height, width) in zip(instances, image_sizes):
        boxes = per_image.gt_boxes.tensor.clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes = boxes[keep]
        scale = boxes.new_tensor([width, height, width, height])
        targets.append(
            {
                "labels": per_image.gt_classes[keep].long(),
                "boxes": box_convert(boxes / scale, "xyxy", "cxcywh"),
                "boxes_xyxy": boxes,
            }
        )
    return targets


def predictions_to_instances(
    class_logits: torch.Tensor,
    boxes: torch.Tensor,
    image_sizes: Sequence[Tuple[int, int]],
    num_select: int,
) -> List[Instances]:
    """
    The ``num_select`` best (query, class) pairs of every image, no NMS.

    Args:
        class_logits: (B, Q, K) logits.
        boxes: (B, Q, 4) cxcywh normalized by the image size.
        image_sizes: (h, w) of every resized, unpadded image.

    Returns:
        Per image an :class:`Instances` of the resized image with ``pred_boxes`` (absolute XYXY),
        ``scores`` and ``pred_classes``.
    """
    batch, num_queries, num_classes = class_logits.shape
    probabilities = class_logits.sigmoid().flatten(1)
    num_select = min(num_select, num_queries * num_classes)
    scores, flat_indices = probabilities.topk(num_select, dim=1)
    query_indices = torch.div(flat_indices, num_classes, rounding_mode="floor")
    labels = flat_indices % num_classes
    selected = torch.gather(boxes, 1, query_indices[..., None].expand(-1, -1, 4))
    selected = box_convert(selected, "cxcywh", "xyxy")
    results = []
    for index, (height, width) in enumerate(image_sizes):
        result = Instances((height, width))
        scale = selected.new_tensor([width, height, width, height])
        result.pred_boxes = Boxes(selected[index].float() * scale)
        result.pred_boxes.clip((height, width))
        result.scores = scores[index]
        result.pred_classes = labels[index]
        results.append(result)
    return results
