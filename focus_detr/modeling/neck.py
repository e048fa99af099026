"""Input projection from a detectron2 backbone to the transformer's multi-scale feature maps.

A neck is any module that maps the backbone's outputs (a dict of (B, C_in, H, W) maps) to L maps
(B, hidden_dim, h_l, w_l), finest first, and declares ``strides`` (L nominal strides) and
``out_channels``. The meta-architecture takes it like the backbone; a config describes a neck
whose input channels come from the backbone with :func:`neck_from_backbone`.
"""

import functools
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from detectron2.layers import ShapeSpec, get_norm
from torch import nn

__all__ = ["NECK_NORMS", "MultiScaleNeck", "neck_from_backbone", "resolve_neck"]

# "GN": GroupNorm (Deformable DETR, DINO); the others: detectron2's batch norms (RT-DETR's input
# projection is a 1x1 conv without bias + BatchNorm).
NECK_NORMS = ("GN", "BN", "SyncBN", "FrozenBN")

NeckBuilder = Callable[..., nn.Module]


class MultiScaleNeck(nn.Module):
    """
    One 1x1 conv + norm per backbone level, then ``num_extra_levels`` levels made by 3x3
    stride-2 conv + norm, the first on the last backbone output and the others on the previous
    extra level. Channels and strides come from the backbone's ``output_shape()``.

    The norm is GroupNorm (Deformable DETR, DINO: convs with bias) or a batch norm (RT-DETR's
    input projection: ``norm="BN"``, ``num_extra_levels=0``; convs without bias, which the
    batch norm's mean would cancel).
    """

    def __init__(
        self,
        *,
        input_shapes: Dict[str, ShapeSpec],
        in_features: Sequence[str],
        out_channels: int = 256,
        num_extra_levels: int = 1,
        num_groups: int = 32,
        norm: str = "GN",
    ):
        """
        Args:
            input_shapes: the backbone's ``output_shape()``.
            in_features: backbone outputs to use, finest first (e.g. ``["res3", "res4", "res5"]``).
            out_channels: channels of every output level.
            num_extra_levels: stride-2 levels appended after the last backbone level.
            num_groups: GroupNorm groups; must divide ``out_channels`` (``norm="GN"`` only).
            norm: one of :data:`NECK_NORMS`: "GN", or detectron2's "BN", "SyncBN" (batch
                statistics over all processes) or "FrozenBN".
        """
        super().__init__()
        if len(in_features) == 0:
            raise ValueError("in_features must name at least one backbone output, got []")
        missing = [name for name in in_features if name not in input_shapes]
        if missing:
            raise ValueError(
                f"in_features {missing} are not backbone outputs; available: {sorted(input_shapes)}"
            )
        if num_extra_levels < 0:
            raise ValueError(f"num_extra_levels must be >= 0, got {num_extra_levels}")
        if norm not in NECK_NORMS:
            raise ValueError(f"norm must be one of {NECK_NORMS}, got {norm!r}")
        if norm == "GN" and out_channels % num_groups != 0:
            raise ValueError(f"num_groups={num_groups} must divide out_channels={out_channels}")
        strides = [input_shapes[name].stride for name in in_features]
        if any(stride is None for stride in strides) or strides != sorted(strides):
            raise ValueError(
                f"in_features must be ordered finest first with strides, got {strides}"
            )
        self.in_features = list(in_features)
        self.out_channels = out_channels
        self.norm = norm
        bias = norm == "GN"

        def make_norm() -> nn.Module:
            if norm == "GN":
                return nn.GroupNorm(num_groups, out_channels)
            return get_norm(norm, out_channels)

        self.projections = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(input_shapes[name].channels, out_channels, kernel_size=1, bias=bias),
                make_norm(),
            )
            for name in in_features
        )
        extra = []
        in_channels = input_shapes[in_features[-1]].channels
        for _ in range(num_extra_levels):
            extra.append(
                nn.Sequential(
                    nn.Conv2d(
                        in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=bias
                    ),
                    make_norm(),
                )
            )
            in_channels = out_channels
        self.extra_levels = nn.ModuleList(extra)
        self.strides: List[int] = strides + [
            strides[-1] * 2 ** (i + 1) for i in range(num_extra_levels)
        ]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight, gain=1)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    def forward(self, features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """
        Args:
            features: backbone outputs by name, each (B, C_in, H, W).

        Returns:
            ``num_levels`` tensors (B, out_channels, H_l, W_l), finest first.
        """
        outputs = [proj(features[name]) for proj, name in zip(self.projections, self.in_features)]
        previous = features[self.in_features[-1]]
        for level in self.extra_levels:
            previous = level(previous)
            outputs.append(previous)
        return outputs


def neck_from_backbone(
    *, neck_class: Callable[..., nn.Module] = MultiScaleNeck, **kwargs
) -> NeckBuilder:
    """
    A neck to be built from the backbone's ``output_shape()``: the meta-architecture calls the
    returned builder with ``input_shapes=backbone.output_shape()`` when it is constructed. A
    LazyConfig thereby describes the neck without knowing the backbone's channels, e.g.
    ``model.neck = L(neck_from_backbone)(in_features=["res3", "res4", "res5"],
    out_channels="${..hidden_dim}", num_extra_levels=1)``.

    Args:
        neck_class: the neck's class (or any callable returning the neck module), called with
            ``input_shapes`` and ``kwargs``.
        kwargs: its other constructor arguments.

    Returns:
        ``builder(input_shapes=...) -> nn.Module``.
    """
    return functools.partial(neck_class, **kwargs)


def resolve_neck(
    neck: Union[nn.Module, NeckBuilder, None], shapes: Dict[str, ShapeSpec], hidden_dim: int
) -> Tuple[Optional[nn.Module], List[int], List[str]]:
    """
    The neck of a meta-architecture whose backbone has the output ``shapes``: a module is taken
    as it is, a builder is called with ``input_shapes=shapes``.

    Returns:
        ``(neck module or None, strides of the levels, the backbone outputs that go straight to
        the encoder when there is no neck, finest first)``.

    Raises:
        ValueError, TypeError: naming the values when the neck or, without one, the backbone's
            outputs do not have ``hidden_dim`` channels, or the neck is no module.
    """
    if neck is None:
        names = sorted(shapes, key=lambda name: shapes[name].stride or 0)
        channels = {name: shapes[name].channels for name in names}
        if not names or any(shapes[name].stride is None for name in names):
            raise ValueError(f"the backbone's outputs need strides, got {shapes}")
        if any(count != hidden_dim for count in channels.values()):
            raise ValueError(
                f"without a neck the backbone's outputs go straight to the encoder and need "
                f"hidden_dim={hidden_dim} channels, got {channels}: give the model a neck "
                "(e.g. neck_from_backbone(...)) or a backbone with those channels"
            )
        return None, [int(shapes[name].stride) for name in names], names
    if not isinstance(neck, nn.Module):
        if not callable(neck):
            raise TypeError(f"neck must be a module, a builder or None, got {neck!r}")
        neck = neck(input_shapes=shapes)
        if not isinstance(neck, nn.Module):
            raise TypeError(f"the neck builder returned {type(neck).__name__}, not a module")
    for attribute in ("strides", "out_channels"):
        if not hasattr(neck, attribute):
            raise TypeError(f"the neck {type(neck).__name__} has no `{attribute}` attribute")
    if neck.out_channels != hidden_dim:
        raise ValueError(
            f"the neck {type(neck).__name__} has out_channels={neck.out_channels} but "
            f"hidden_dim={hidden_dim}"
        )
    return neck, [int(stride) for stride in neck.strides], []
