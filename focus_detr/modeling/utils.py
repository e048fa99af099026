"""Small tensor helpers shared by the encoder, the decoder and the heads."""

import copy
import math
from typing import Tuple

import torch
from torch import nn

__all__ = [
    "BOX_FRAMES",
    "MLP",
    "check_box_frame",
    "clone_modules",
    "detection_heads",
    "inverse_sigmoid",
]

# Coordinate frames of normalized boxes: "valid" relative to each image's own size (the package's
# convention), "padded" relative to the padded batch. Query selection and decoder must agree.
BOX_FRAMES = ("padded", "valid")


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Logit of ``x`` clamped to [0, 1]; ``eps`` keeps the result finite."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def clone_modules(module: nn.Module, count: int) -> nn.ModuleList:
    """``count`` independent deep copies of ``module``."""
    return nn.ModuleList(copy.deepcopy(module) for _ in range(count))


def check_box_frame(frame: str) -> str:
    """``frame`` if it is one of :data:`BOX_FRAMES`, else a ValueError naming it."""
    if frame not in BOX_FRAMES:
        raise ValueError(f"frame must be one of {BOX_FRAMES}, got {frame!r}")
    return frame


def detection_heads(embed_dim: int, num_classes: int, prior_prob: float) -> Tuple[nn.Linear, "MLP"]:
    """
    A DETR class head ``Linear(C, K)`` whose bias starts every class at probability
    ``prior_prob`` (focal-loss initialisation) and a 3-layer box MLP ``C -> C -> C -> 4`` whose last
    layer starts at zero (first predictions = the reference boxes). Created in that order.
    """
    if not 0.0 < prior_prob < 1.0:
        raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob}")
    class_head = nn.Linear(embed_dim, num_classes)
    box_head = MLP(embed_dim, embed_dim, 4, 3)
    nn.init.constant_(class_head.bias, -math.log((1 - prior_prob) / prior_prob))
    nn.init.zeros_(box_head.layers[-1].weight)
    nn.init.zeros_(box_head.layers[-1].bias)
    return class_head, box_head
