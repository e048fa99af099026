"""The exportable form of a two-stage DETR: one image tensor in, three detection tensors out."""

from typing import Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import ImageList
from torch import nn
from torchvision.ops import clip_boxes_to_image

from ..modeling.detection_targets import select_detections

__all__ = ["DetectorExportWrapper"]


class DetectorExportWrapper(nn.Module):
    """
    ``image -> (boxes, scores, classes)`` for one image of a fixed size, by the detector's own
    methods: ``_normalize`` (pixel mean / std), the padding of ``preprocess_image`` (measured
    once, in eager mode, for the export size), ``predict`` (backbone, neck, encoder, query
    selection, decoder) and ``select_detections`` (top ``num_select`` over the queries x classes
    scores of the last decoder layer, boxes scaled to the image), then boxes clipped to the
    image as ``detector_postprocess`` does.

    The difference with ``model.inference``: all ``num_select`` detections are returned, while
    ``detector_postprocess`` drops boxes that have no area after clipping (rare: the decoder's
    boxes have positive sizes). Drop rows with ``x2 <= x1`` or ``y2 <= y1`` to get its list.
    """

    def __init__(self, model: nn.Module, *, height: int, width: int):
        """
        Args:
            model: a ``TwoStageDETR`` (``FocusDETR``); it is put in eval mode.
            height, width: the size of the images the exported program takes.
        """
        super().__init__()
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for method in ("_normalize", "preprocess_image", "predict"):
            if not callable(getattr(model, method, None)):
                raise TypeError(
                    f"{type(model).__name__} has no {method}(): the export wrapper needs a "
                    "TwoStageDETR"
                )
        self.model = model.eval()
        self.height = height
        self.width = width
        self.num_select = int(model.num_select)
        with torch.no_grad():
            probe = torch.zeros(3, height, width, device=model.device)
            padded = model.preprocess_image([{"image": probe}]).tensor.shape[-2:]
        self.padded_height, self.padded_width = int(padded[0]), int(padded[1])
        self.eval()

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            image: (3, height, width) float tensor in the model's ``input_format``, 0-255.

        Returns:
            ``boxes`` (S, 4) absolute XYXY in the image, ``scores`` (S,) in decreasing order,
            ``classes`` (S,) int64, with S = min(num_select, queries x classes).
        """
        expected = (3, self.height, self.width)
        if tuple(image.shape) != expected:
            raise ValueError(
                f"this wrapper was built for images of shape {expected}, got "
                f"{tuple(image.shape)}: resize the image first"
            )
        normalized = self.model._normalize(image)
        padding = (0, self.padded_width - self.width, 0, self.padded_height - self.height)
        images = ImageList(F.pad(normalized, padding)[None], [(self.height, self.width)])
        decoded = self.model.predict(images).decoder
        boxes, scores, classes = select_detections(
            decoded.class_logits[-1], decoded.boxes[-1], images.image_sizes, self.num_select
        )
        return clip_boxes_to_image(boxes[0], (self.height, self.width)), scores[0], classes[0]

    def extra_repr(self) -> str:
        return (
            f"height={self.height}, width={self.width}, padded=({self.padded_height}, "
            f"{self.padded_width}), num_select={self.num_select}"
        )
