"""Load a config and weights, run one image the way the config's test loader would."""

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import transforms as T
from detectron2.data.detection_utils import convert_image_to_rgb
from detectron2.structures import Instances

from focus_detr.engine.checkpoint import SafeCheckpointer
from focus_detr.engine.overrides import apply_overrides

__all__ = ["TokenSelection", "Prediction", "FocusDETRPredictor", "load_config"]


@dataclass
class TokenSelection:
    """
    What the encoder of one image saw and selected, on the CPU.

    Attributes:
        foreground_logits: (N,) foreground logits of the token selector; None for an encoder
            without a selector.
        layer_indices: one (k_l,) int64 tensor per encoder layer: the tokens it gathered.
        layer_valid: one (k_l,) bool tensor per layer: True where it wrote the token back.
        spatial_shapes: (L, 2) int64 (h_l, w_l) of every level, finest first.
        padding_mask: (N,) bool, True on the padded tokens (as the encoder received it).
        image_size: (h, w) of the network input (resized, before padding).
        padded_size: (H, W) of the padded network input.
        strides: nominal stride of every level (e.g. 8, 16, 32, 64), for titles.
    """

    foreground_logits: Optional[torch.Tensor]
    layer_indices: List[torch.Tensor]
    layer_valid: List[torch.Tensor]
    spatial_shapes: torch.Tensor
    padding_mask: torch.Tensor
    image_size: Tuple[int, int]
    padded_size: Tuple[int, int]
    strides: List[int]


@dataclass
class Prediction:
    """
    Attributes:
        image_rgb: (H0, W0, 3) uint8 original image in RGB.
        instances: detections in original image coordinates (pred_boxes, scores, pred_classes).
        tokens: the encoder's token selection of this image.
    """

    image_rgb: np.ndarray
    instances: Instances
    tokens: TokenSelection


def load_config(config_file: str, overrides: Sequence[str] = ()):
    """
    ``LazyConfig.load`` + overrides that must name existing keys
    (:func:`focus_detr.engine.overrides.apply_overrides`); a clear error when the file is missing.
    """
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file not found: {config_file}")
    cfg = LazyConfig.load(config_file)
    return apply_overrides(cfg, list(overrides))


class FocusDETRPredictor:
    """
    Builds ``cfg.model``, loads weights and runs single images preprocessed like the test
    mapper of the config (its augmentations and image format). What the encoder selected comes
    from ``model.inference(..., return_details=True)``, so any encoder works.
    """

    def __init__(self, cfg, *, weights: str, device: str = "cpu"):
        """
        Args:
            cfg: a LazyConfig with ``model`` and ``dataloader.test.mapper``.
            weights: checkpoint file (``DetectionCheckpointer`` format or a ``{"model": ...}``
                dict saved with ``torch.save``).
            device: torch device string for inference.
        """
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"weights file not found: {weights}")
        self.cfg = cfg
        self.model = instantiate(cfg.model)
        self.model.to(torch.device(device))
        self.model.eval()
        SafeCheckpointer(self.model).load(weights)
        mapper = cfg.dataloader.test.get("mapper", {}) if "dataloader" in cfg else {}
        self.augmentations = T.AugmentationList(
            [instantiate(aug) for aug in mapper.get("augmentations", [])]
        )
        self.input_format = mapper.get("image_format", getattr(self.model, "input_format", "RGB"))

    @property
    def strides(self) -> List[int]:
        return list(getattr(self.model, "strides", []))

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> Prediction:
        """
        Args:
            image: (H0, W0, 3) uint8 image in ``self.input_format``
                (``focus_detr.data.read_image(path, format=predictor.input_format)``).
        """
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
        height, width = image.shape[:2]
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        inputs = {"image": tensor, "height": height, "width": width}

        outputs, details = self.model.inference([inputs], return_details=True)
        tokens = _token_selection(
            details, image_size=tuple(tensor.shape[-2:]), strides=self.strides
        )
        return Prediction(
            image_rgb=np.asarray(convert_image_to_rgb(image, self.input_format), dtype=np.uint8),
            instances=outputs[0]["instances"].to("cpu"),
            tokens=tokens,
        )


def _token_selection(details, *, image_size, strides) -> TokenSelection:
    """The first (only) image of ``model.inference(..., return_details=True)``, on the CPU."""
    features, encoded = details.features, details.encoder
    padding_mask = features.padding_mask[0]
    all_tokens = torch.arange(padding_mask.shape[0], device=padding_mask.device)
    layer_indices, layer_valid = [], []
    for layer in range(encoded.num_layers):
        indices = encoded.layer_indices[layer]
        # None: the layer updated every valid token (dense layers)
        indices = all_tokens if indices is None else indices[0]
        layer_indices.append(indices.cpu())
        layer_valid.append(encoded.updated_mask(layer, features.padding_mask)[0][indices].cpu())
    scores = encoded.token_scores
    return TokenSelection(
        foreground_logits=None if scores is None else scores[0].detach().cpu(),
        layer_indices=layer_indices,
        layer_valid=layer_valid,
        spatial_shapes=features.spatial_shapes.cpu(),
        padding_mask=padding_mask.cpu(),
        image_size=(int(image_size[0]), int(image_size[1])),
        padded_size=features.padded_size,
        strides=list(strides),
    )
