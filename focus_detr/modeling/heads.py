"""The class and box heads of the DETR family."""

import copy
import math
from typing import Tuple

from torch import nn
from torchvision.ops import MLP

__all__ = ["box_mlp", "clone_modules", "detection_heads"]


def box_mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> MLP:
    """
    ``num_layers`` linear layers ``in_dim -> hidden_dim -> ... -> out_dim`` with ReLU between
    them (none after the last): a ``torchvision.ops.MLP`` whose linear layers sit at indices
    0, 3, 6, ... (a zero-probability dropout follows each activation).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return MLP(in_dim, [hidden_dim] * (num_layers - 1) + [out_dim], activation_layer=nn.ReLU)


def detection_heads(embed_dim: int, num_classes: int, prior_prob: float) -> Tuple[nn.Linear, MLP]:
    """
    A DETR class head ``Linear(C, K)`` whose bias starts every class at probability
    ``prior_prob`` (focal-loss initialisation) and a 3-layer box MLP ``C -> C -> C -> 4`` whose last
    layer starts at zero (first predictions = the reference boxes). Created in that order.
    """
    if not 0.0 < prior_prob < 1.0:
        raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob}")
    class_head = nn.Linear(embed_dim, num_classes)
    box_head = box_mlp(embed_dim, embed_dim, 4, num_layers=3)
    nn.init.constant_(class_head.bias, -math.log((1 - prior_prob) / prior_prob))
    nn.init.zeros_(box_head[-2].weight)
    nn.init.zeros_(box_head[-2].bias)
    return class_head, box_head


def clone_modules(module: nn.Module, count: int) -> nn.ModuleList:
    """``count`` independent deep copies of ``module``."""
    return nn.ModuleList(copy.deepcopy(module) for _ in range(count))
