"""Ground truth in the forms the losses need, and predictions back to detectron2 Instances."""

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils.logger import log_every_n_seconds
from torchvision.ops import box_convert, clip_boxes_to_image

from .multi_scale import ImageSizes, image_sizes_tensor

__all__ = ["instances_to_targets", "predictions_to_instances", "select_detections"]

logger = logging.getLogger(__name__)


def instances_to_targets(
    instances: Sequence[Instances],
    image_sizes: Sequence[Tuple[int, int]],
    num_classes: int,
    *,
    device: Optional[torch.device] = None,
) -> List[Dict[str, torch.Tensor]]:
    """
    Args:
        instances: per image, ``gt_boxes`` (absolute XYXY in the resized image) and ``gt_classes``.
        image_sizes: (h, w) of every resized, unpadded image.
        num_classes: K; every class id must lie in [0, K).
        device: where the targets go (default: where the instances are). The ground truth is
            checked and cleaned where it is, the data loader's CPU tensors, and then copied
            without waiting for the device: checking it there would read the device back.

    Returns:
        Per image a dict with ``labels`` (M,) int64, ``boxes`` (M, 4) cxcywh normalized by the
        image size, and ``boxes_xyxy`` (M, 4) absolute XYXY. Boxes are clipped to the image;
        boxes with a non-finite coordinate and boxes without area after clipping (zero-area,
        inverted, or wholly outside the image) are dropped with a logged warning: they have no
        foreground location and would make GIoU undefined.

    Raises:
        ValueError: a class id outside [0, num_classes), naming the image and the id.
    """
    targets = []
    for index, (per_image, (height, width)) in enumerate(zip(instances, image_sizes)):
        classes = per_image.gt_classes.long()
        if classes.numel() > 0 and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
            bad = classes[(classes < 0) | (classes >= num_classes)].unique().tolist()
            raise ValueError(
                f"image {index} of the batch has ground-truth class ids {bad} outside "
                f"[0, {num_classes}): set model.num_classes to the dataset's class count"
            )
        boxes = per_image.gt_boxes.tensor.clone()
        finite = torch.isfinite(boxes).all(dim=1)
        boxes = torch.where(finite[:, None], boxes, torch.zeros_like(boxes))
        boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=height)
        keep = finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not bool(keep.all()):
            dropped = per_image.gt_boxes.tensor[~keep]
            log_every_n_seconds(
                logging.WARNING,
                f"dropped {len(dropped)} ground-truth boxes without area in image {index} "
                f"({height}x{width}), e.g. {dropped[0].tolist()} (non-finite, zero-area, "
                "inverted or outside the image)",
                n=10,
                name=__name__,
            )
        boxes = boxes[keep]
        scale = boxes.new_tensor([width, height, width, height])
        target = {
            "labels": classes[keep],
            "boxes": box_convert(boxes / scale, "xyxy", "cxcywh"),
            "boxes_xyxy": boxes,
        }
        if device is not None:
            target = {key: value.to(device, non_blocking=True) for key, value in target.items()}
        targets.append(target)
    return targets


def select_detections(
    class_logits: torch.Tensor,
    boxes: torch.Tensor,
    image_sizes: ImageSizes,
    num_select: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    The ``num_select`` best (query, class) pairs of every image, no NMS, as tensors (the part of
    :func:`predictions_to_instances` that ``torch.export`` can trace: no ``Instances``, no
    data-dependent check).

    Args:
        class_logits: (B, Q, K) logits.
        boxes: (B, Q, 4) cxcywh normalized by the image size.
        image_sizes: (h, w) of every resized, unpadded image (ints, or (2,) tensors while
            tracing).
        num_select: detections per image; S = min(num_select, Q * K) are returned.

    Returns:
        ``(boxes (B, S, 4) absolute XYXY in the image, not clipped, scores (B, S) sigmoid
        probabilities in decreasing order, classes (B, S) int64)``.
    """
    batch, num_queries, num_classes = class_logits.shape
    probabilities = class_logits.sigmoid().flatten(1)
    num_select = min(num_select, num_queries * num_classes)
    scores, flat_indices = probabilities.topk(num_select, dim=1)
    query_indices = torch.div(flat_indices, num_classes, rounding_mode="floor")
    labels = flat_indices % num_classes
    selected = torch.gather(boxes, 1, query_indices[..., None].expand(-1, -1, 4))
    selected = box_convert(selected, "cxcywh", "xyxy")
    sizes = image_sizes_tensor(image_sizes, boxes.device).to(selected.dtype)
    scale = sizes.flip(-1).repeat(1, 2)  # (B, 4) w, h, w, h (no list index: a host copy)
    return selected * scale[:, None, :], scores, labels


def predictions_to_instances(
    class_logits: torch.Tensor,
    boxes: torch.Tensor,
    image_sizes: ImageSizes,
    num_select: int,
) -> List[Instances]:
    """
    The ``num_select`` best (query, class) pairs of every image, no NMS.

    Args:
        class_logits: (B, Q, K) logits.
        boxes: (B, Q, 4) cxcywh normalized by the image size.
        image_sizes: (h, w) of every resized, unpadded image (ints, or (2,) tensors while
            tracing).
        num_select: detections per image.

    Returns:
        Per image an :class:`Instances` of the resized image with ``pred_boxes`` (absolute XYXY,
        clipped to the image), ``scores`` and ``pred_classes``.
    """
    selected, scores, labels = select_detections(class_logits, boxes, image_sizes, num_select)
    results = []
    for index, image_size in enumerate(image_sizes):
        result = Instances(tuple(image_size))
        # clamped as Boxes.clip does, without its finiteness assertion (a read of the device)
        result.pred_boxes = Boxes(clip_boxes_to_image(selected[index], result.image_size))
        result.scores = scores[index]
        result.pred_classes = labels[index]
        results.append(result)
    return results
