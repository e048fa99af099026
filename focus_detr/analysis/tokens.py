"""
Which tokens the encoder updates: how many per layer, and how many of the ground-truth
foreground tokens (the targets of Focus-DETR's foreground token selector).
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from focus_detr.modeling import EncoderOutput, compute_foreground_targets, default_size_ranges
from focus_detr.modeling.detection_targets import instances_to_targets

from .inputs import model_inputs

__all__ = [
    "TokenStatistics",
    "collect_token_statistics",
    "foreground_coverage",
    "fit_size_ranges",
    "foreground_size_ranges",
    "foreground_token_mask",
]


def foreground_size_ranges(encoder: nn.Module, num_levels: int) -> List[Tuple[float, float]]:
    """The encoder's own foreground ranges (Focus: ``foreground_loss.ranges``), else
    :func:`~focus_detr.modeling.default_size_ranges`."""
    ranges = getattr(getattr(encoder, "foreground_loss", None), "ranges", None)
    return [tuple(pair) for pair in (ranges or default_size_ranges(num_levels))]


def fit_size_ranges(
    ranges: Sequence[Tuple[float, float]], num_levels: int
) -> List[Tuple[float, float]]:
    """
    The object-size ranges of a model with ``num_levels`` levels, finest first, from ranges
    defined for as many or more levels (e.g. the 4 ranges of a 4-level Focus model for a
    3-level RT-DETR model, both from stride 8): the finest ``num_levels`` ranges, the last of
    them extended to the upper bound of the last range (as in FCOS, the coarsest level takes
    every larger object).

    Raises:
        ValueError: naming the values when there are fewer ranges than levels.
    """
    ranges = [tuple(pair) for pair in ranges]
    if len(ranges) < num_levels:
        raise ValueError(
            f"{len(ranges)} foreground size ranges {ranges} cannot define the foreground tokens "
            f"of {num_levels} levels"
        )
    fitted = ranges[:num_levels]
    fitted[-1] = (fitted[-1][0], ranges[-1][1])
    return fitted


def foreground_token_mask(
    boxes_xyxy: Sequence[torch.Tensor],
    level_shapes: Sequence[Tuple[int, int]],
    strides: Sequence[int],
    padding_mask: torch.Tensor,
    ranges: Sequence[Tuple[float, float]],
) -> torch.Tensor:
    """
    (B, N) bool: the valid tokens that are positive foreground-selector targets
    (:func:`~focus_detr.modeling.compute_foreground_targets`) of the ground-truth boxes.

    Args:
        boxes_xyxy: per image (M_i, 4) absolute boxes in the resized input.
        level_shapes, strides: the geometry of the flattened features.
        padding_mask: (B, N) bool, True on padded tokens.
        ranges: one (lo, hi] object-size range per level.
    """
    targets = compute_foreground_targets(
        boxes_xyxy, level_shapes, strides, ranges, device=padding_mask.device
    )
    return targets.bool() & ~padding_mask


def foreground_coverage(
    encoded: EncoderOutput, padding_mask: torch.Tensor, foreground: torch.Tensor
) -> torch.Tensor:
    """
    (num_layers,) int64: per encoder layer, how many ``foreground`` tokens (B, N) bool it
    updated, summed over the batch.
    """
    return torch.stack(
        [
            (encoded.updated_mask(layer, padding_mask) & foreground).sum()
            for layer in range(encoded.num_layers)
        ]
    ).cpu()


def _range_text(pair: Tuple[float, float]) -> str:
    lo, hi = pair
    return f"({lo:g}, {'inf' if math.isinf(hi) else f'{hi:g}'}]"


class TokenStatistics:
    """Accumulates, image by image, the tokens every encoder layer updated and, with ground
    truth, the foreground tokens it updated."""

    def __init__(self):
        self.valid: List[int] = []
        self.updated: List[torch.Tensor] = []  # per image (num_layers,)
        self.covered: Optional[torch.Tensor] = None  # (num_layers,) summed over images
        self.foreground: List[int] = []  # per image with ground truth
        self.ranges: Optional[List[Tuple[float, float]]] = None

    def add(
        self,
        encoded: EncoderOutput,
        padding_mask: torch.Tensor,
        foreground: Optional[torch.Tensor] = None,
    ) -> None:
        """Add a batch: its encoder output, (B, N) padding mask and foreground tokens."""
        self.valid += (~padding_mask).sum(dim=1).tolist()
        self.updated += list(encoded.tokens_updated(padding_mask).t().cpu())
        if foreground is not None:
            covered = foreground_coverage(encoded, padding_mask, foreground)
            self.covered = covered if self.covered is None else self.covered + covered
            self.foreground += foreground.sum(dim=1).tolist()

    def tokens_summary(self) -> Dict[str, object]:
        """Per layer the mean number of tokens updated per image and its mean share of the
        image's valid tokens; the mean number of valid tokens."""
        if not self.updated:
            raise ValueError("no image was added")
        updated = torch.stack(self.updated).double()  # (images, layers)
        valid = torch.tensor(self.valid, dtype=torch.float64)
        return {
            "images": len(self.valid),
            "valid_tokens": float(valid.mean()),
            "updated_per_layer": updated.mean(dim=0).tolist(),
            "updated_share_per_layer": (updated / valid[:, None]).mean(dim=0).tolist(),
        }

    def quality_summary(self) -> Optional[Dict[str, object]]:
        """
        Per layer the share of the ground-truth foreground tokens (pooled over the images) it
        updated; None without ground truth. The shares are None when no image has a
        foreground token.
        """
        if self.covered is None:
            return None
        total = sum(self.foreground)
        return {
            "images": len(self.foreground),
            "ranges": [_range_text(pair) for pair in self.ranges or []],
            "foreground_tokens": total,
            "foreground_tokens_per_image": total / len(self.foreground),
            "foreground_share_per_layer": (
                (self.covered.double() / total).tolist() if total > 0 else None
            ),
        }


def collect_token_statistics(
    model: nn.Module,
    inputs: Sequence[Dict],
    ranges: Optional[Sequence[Tuple[float, float]]] = None,
) -> TokenStatistics:
    """
    Run ``model.inference(..., return_details=True)`` on every input (batch 1) and collect
    what the encoder updated. When every input has ground-truth ``instances`` (in the resized
    image, as a dataset mapper in training mode gives them), the foreground tokens are those of
    :func:`foreground_token_mask` with ``ranges`` (fitted to the model's level count by
    :func:`fit_size_ranges`; default: :func:`foreground_size_ranges` of the encoder).
    """
    if model.training:
        raise ValueError("collect token statistics of a model in eval mode")
    statistics = TokenStatistics()
    with_truth = bool(inputs) and all("instances" in item for item in inputs)
    with torch.no_grad():
        for item, model_input in zip(inputs, model_inputs(inputs)):
            _, details = model.inference([model_input], return_details=True)
            features = details.features
            foreground = None
            if with_truth:
                statistics.ranges = (
                    fit_size_ranges(ranges, features.num_levels)
                    if ranges is not None
                    else foreground_size_ranges(model.encoder, features.num_levels)
                )
                targets = instances_to_targets(
                    [item["instances"].to(features.padding_mask.device)],
                    details.images.image_sizes,
                    model.num_classes,
                )
                foreground = foreground_token_mask(
                    [target["boxes_xyxy"] for target in targets],
                    features.level_shapes,
                    features.strides,
                    features.padding_mask,
                    statistics.ranges,
                )
            statistics.add(details.encoder, features.padding_mask, foreground)
    return statistics
