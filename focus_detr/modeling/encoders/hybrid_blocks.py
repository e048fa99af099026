"""The convolution blocks of RT-DETR's cross-scale fusion: conv + norm, RepVGG block, CSP layer."""

from typing import Optional

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d, get_norm
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "CSPRepLayer",
    "RepVggBlock",
    "conv_norm",
    "fuse_rep_vgg_blocks",
    "make_activation",
]

ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU}


def make_activation(name: Optional[str]) -> Optional[nn.Module]:
    """The activation module called ``name`` (a key of :data:`ACTIVATIONS`), or None."""
    if name is None:
        return None
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} or None, got {name!r}")
    return ACTIVATIONS[name]()


def conv_norm(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    norm: str = "BN",
    activation: Optional[str] = None,
) -> Conv2d:
    """
    RT-DETR's ``ConvNormLayer``: a ``kernel_size`` conv without bias, padding
    ``(kernel_size - 1) // 2``, then a norm, then the activation; a detectron2 ``Conv2d``.

    Args:
        norm: a detectron2 norm name ("BN", "SyncBN", "FrozenBN", "GN").
        activation: a key of :data:`ACTIVATIONS` or None.

    Returns:
        the module mapping (B, in_channels, H, W) to (B, out_channels, ceil(H / stride),
        ceil(W / stride)).
    """
    return Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=(kernel_size - 1) // 2,
        bias=False,
        norm=get_norm(norm, out_channels),
        activation=make_activation(activation),
    )


def _fold_norm(conv: Conv2d) -> "tuple[torch.Tensor, torch.Tensor]":
    """(kernel, bias) of ``conv`` followed by its batch norm in eval mode, as one conv."""
    norm = conv.norm
    if not isinstance(norm, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)):
        raise ValueError(f"only batch norms fold into a convolution, got {type(norm).__name__}")
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    return conv.weight * scale[:, None, None, None], norm.bias - norm.running_mean * scale


class RepVggBlock(nn.Module):
    """
    RepVGG block without identity branch (RT-DETR): ``act(BN(conv3x3(x)) + BN(conv1x1(x)))``,
    channels unchanged. :meth:`fuse` folds both branches into one 3x3 conv with bias
    (RepVGG's deployment form), equal to the block's eval-mode output.
    """

    def __init__(self, *, channels: int, norm: str = "BN", activation: Optional[str] = "relu"):
        """
        Args:
            channels: input and output channels.
            norm: see :func:`conv_norm`.
            activation: a key of :data:`ACTIVATIONS` or None (RT-DETR's default "relu"; its
                CSP layers pass "silu").
        """
        super().__init__()
        self.conv3x3 = conv_norm(channels, channels, 3, norm=norm)
        self.conv1x1 = conv_norm(channels, channels, 1, norm=norm)
        self.fused: Optional[nn.Conv2d] = None
        self.activation = make_activation(activation) or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        if self.fused is not None:
            return self.activation(self.fused(x))
        return self.activation(self.conv3x3(x) + self.conv1x1(x))

    @torch.no_grad()
    def fuse(self) -> None:
        """
        Replace the two conv + batch-norm branches by one 3x3 conv with bias that gives the
        eval-mode output (running statistics); the branches are removed. Idempotent.
        """
        if self.fused is not None:
            return
        kernel3, bias3 = _fold_norm(self.conv3x3)
        kernel1, bias1 = _fold_norm(self.conv1x1)
        channels = kernel3.shape[0]
        fused = nn.Conv2d(channels, channels, 3, padding=1).to(kernel3)
        fused.weight.copy_(kernel3)
        fused.weight[:, :, 1:2, 1:2] += kernel1
        fused.bias.copy_(bias3 + bias1)
        self.fused = fused
        del self.conv3x3
        del self.conv1x1


class CSPRepLayer(nn.Module):
    """
    RT-DETR's CSP layer: two 1x1 conv-norm-act branches of ``hidden = int(out * expansion)``
    channels from the input; ``num_blocks`` :class:`RepVggBlock` on the first; the branches
    summed; a 1x1 conv-norm-act to ``out_channels`` when ``hidden != out_channels``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        num_blocks: int = 3,
        expansion: float = 1.0,
        norm: str = "BN",
        activation: Optional[str] = "silu",
    ):
        """
        Args:
            in_channels, out_channels: channels of the input and the output.
            num_blocks: RepVGG blocks (RT-DETR: ``round(3 * depth_mult)``).
            expansion: hidden channels relative to ``out_channels``.
            norm, activation: of every conv (see :func:`conv_norm`).
        """
        super().__init__()
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        hidden = int(out_channels * expansion)
        if hidden <= 0:
            raise ValueError(
                f"expansion={expansion} gives {hidden} hidden channels for "
                f"out_channels={out_channels}"
            )
        self.conv1 = conv_norm(in_channels, hidden, 1, norm=norm, activation=activation)
        self.conv2 = conv_norm(in_channels, hidden, 1, norm=norm, activation=activation)
        self.blocks = nn.ModuleList(
            RepVggBlock(channels=hidden, norm=norm, activation=activation)
            for _ in range(num_blocks)
        )
        self.conv3 = (
            conv_norm(hidden, out_channels, 1, norm=norm, activation=activation)
            if hidden != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x: (B, in_channels, H, W).
            valid: optional (B, 1, H, W) 1 on image cells, 0 on padding, in ``x``'s dtype:
                the input of every RepVGG block is multiplied by it, so that its 3x3 conv
                sees zeros beyond the image as it would on the image alone.

        Returns:
            (B, out_channels, H, W).
        """
        branch = self.conv1(x)
        for block in self.blocks:
            if valid is not None:
                branch = branch * valid
            branch = block(branch)
        return self.conv3(branch + self.conv2(x))


def fuse_rep_vgg_blocks(module: nn.Module) -> int:
    """Fuse every :class:`RepVggBlock` in ``module`` (:meth:`RepVggBlock.fuse`); returns how
    many there are. For inference: the fused blocks give the eval-mode output."""
    blocks = [child for child in module.modules() if isinstance(child, RepVggBlock)]
    for block in blocks:
        block.fuse()
    return len(blocks)
