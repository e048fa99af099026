"""Token budgets and rankings shared by the encoders that update a subset of the tokens."""

import math
from typing import List, Sequence, Tuple

import torch

__all__ = [
    "BUDGET_RULES",
    "SCORE_PRODUCTS",
    "check_keep_ratio",
    "compute_token_budgets",
    "fill_padding_with_minimum",
    "fine_grained_scores",
]

SCORE_PRODUCTS = ("probability", "logit")
BUDGET_RULES = ("image", "batch")


def check_keep_ratio(keep_ratio: float) -> float:
    """``keep_ratio`` as a float if it lies in (0, 1], else a ValueError naming it."""
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)):
        raise ValueError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    return float(keep_ratio)


def compute_token_budgets(
    valid_counts: Sequence[int],
    keep_ratio: float,
    layer_keep_factors: Sequence[float],
    *,
    rule: str = "image",
) -> Tuple[List[int], List[List[int]]]:
    """
    How many tokens every layer gathers, and how many of them each image may write, from the
    images' valid token counts as Python ints (no tensor is read).

    Per image ``n_i = floor(keep_ratio * valid_i) + 1`` clamped to ``valid_i``, ``K = max_i n_i``
    (at least 1). Layer l gathers ``k_l = max(1, floor(c_l * K))`` tokens per image (a
    rectangular batch) and image i writes the first ``b_il`` of them:

    - ``rule="image"``: ``b_il = min(n_i, max(1, floor(c_l * n_i)))``: the cascade factor
      applies to every image's own budget, so an image is encoded exactly as it would be alone,
      whatever the other images of its batch;
    - ``rule="batch"`` (the reference): ``b_il = min(k_l, n_i)``: the cascade factor applies to
      the batch's largest budget, so a small image next to a large one writes its whole budget
      in every layer until ``k_l < n_i``.

    Both rules agree on a batch of one image, and on images with the batch's largest budget.

    Args:
        valid_counts: B valid (non-padded) token counts (``FlattenedFeatures.valid_token_counts``).
        keep_ratio: rho in (0, 1].
        layer_keep_factors: c_l in (0, 1], one per layer.
        rule: "image" or "batch", see above.

    Returns:
        ``(layer_sizes, budgets)``: k_l per layer, and b_il as ``budgets[l][i]``, Python ints.
    """
    if rule not in BUDGET_RULES:
        raise ValueError(f"rule must be one of {BUDGET_RULES}, got {rule!r}")
    # Python floats are float64: the products round exactly as float64 tensor arithmetic
    focus = [min(math.floor(int(count) * keep_ratio) + 1, int(count)) for count in valid_counts]
    max_focus = max(max(focus, default=1), 1)
    layer_sizes = [max(1, int(factor * max_focus)) for factor in layer_keep_factors]
    if rule == "batch":
        budgets = [[min(size, count) for count in focus] for size in layer_sizes]
    else:
        budgets = [
            [min(max(math.floor(count * factor), 1), count) for count in focus]
            for factor in layer_keep_factors
        ]
    return layer_sizes, budgets


def fine_grained_scores(
    class_logits: torch.Tensor, foreground_logits: torch.Tensor, mode: str = "probability"
) -> torch.Tensor:
    """
    The multi-category score times the foreground score, for ranking only.

    Args:
        class_logits: (B, k, K) class logits of the tokens.
        foreground_logits: (B, k) FTS logits of the tokens.
        mode: "probability": ``max_c sigmoid(class_c) * sigmoid(fts)``; "logit": the reference's
            ``max_c class_c * fts`` on raw logits, where two negative logits rank high.

    Returns:
        (B, k) scores.
    """
    best_class = class_logits.max(dim=-1).values
    if mode == "probability":
        return best_class.sigmoid() * foreground_logits.sigmoid()
    if mode == "logit":
        return best_class * foreground_logits
    raise ValueError(f"mode must be one of {SCORE_PRODUCTS}, got {mode!r}")


def fill_padding_with_minimum(logits: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """
    (B, N) selector logits with padded tokens set to the smallest valid logit of the batch (0
    when there is none): finite values that never outrank a real token, for visualisation and
    for losses. The fill is detached; valid entries keep their gradient.
    """
    smallest = logits.detach().masked_fill(padding_mask, float("inf")).min()
    smallest = torch.where(smallest.isfinite(), smallest, torch.zeros_like(smallest))
    return torch.where(padding_mask, smallest, logits)
