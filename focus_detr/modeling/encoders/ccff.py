"""RT-DETR's CNN-based cross-scale feature fusion (CCFF): a top-down then a bottom-up pass."""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .hybrid_blocks import CSPRepLayer, conv_norm

__all__ = ["CrossScaleFusion", "check_halving_shapes"]


def check_halving_shapes(level_shapes: Sequence[Tuple[int, int]]) -> None:
    """
    ValueError naming the shapes unless every level is the previous one halved, rounded up
    (``h_{l+1} = ceil(h_l / 2)``, same for w): what stride-2 backbones give and what the
    fusion's stride-2 downsampling produces.
    """
    for (height, width), (next_height, next_width) in zip(level_shapes, level_shapes[1:]):
        if (next_height, next_width) != (-(-height // 2), -(-width // 2)):
            raise ValueError(
                f"each level must be the previous one halved (rounded up), got level shapes "
                f"{list(level_shapes)}"
            )


class CrossScaleFusion(nn.Module):
    """
    CCFF of RT-DETR's hybrid encoder on L maps of C channels, finest first:

    - top-down, from the coarsest level: the coarser result goes through a 1x1 lateral
      conv-norm-act (which replaces it as that level's top-down output), is upsampled x2
      (nearest), concatenated with the finer map (upsampled first) and fused by a
      :class:`CSPRepLayer` (2C -> C) into the finer level's top-down output;
    - bottom-up, from the finest top-down output: a 3x3 stride-2 conv-norm-act downsamples
      it, it is concatenated with the next coarser top-down output (downsampled first) and
      fused by a :class:`CSPRepLayer` into that level's output.

    The finest output is its top-down output; every level is rewritten by the top-down pass,
    every level but the finest by the bottom-up pass. Maps whose sizes are not exact halves
    (``ceil`` rounding of odd sizes) are handled by cropping the upsampled map to the finer
    level's size; on exact halves this is RT-DETR's ``interpolate(scale_factor=2)``.
    """

    def __init__(
        self,
        *,
        channels: int = 256,
        num_levels: int = 3,
        num_blocks: int = 3,
        expansion: float = 1.0,
        norm: str = "BN",
        activation: Optional[str] = "silu",
    ):
        """
        Args:
            channels: C, of every input and output map.
            num_levels: L >= 2.
            num_blocks, expansion: of every :class:`CSPRepLayer` (RT-DETR: 3 blocks at
                ``depth_mult=1``, expansion 1.0).
            norm, activation: of every conv (RT-DETR: "BN", "silu").
        """
        super().__init__()
        if num_levels < 2:
            raise ValueError(f"cross-scale fusion needs num_levels >= 2, got {num_levels}")
        self.num_levels = num_levels

        def csp() -> CSPRepLayer:
            return CSPRepLayer(
                in_channels=2 * channels,
                out_channels=channels,
                num_blocks=num_blocks,
                expansion=expansion,
                norm=norm,
                activation=activation,
            )

        # index i of the top-down modules works on the pair (coarser L-1-i, finer L-2-i)
        self.lateral_convs = nn.ModuleList(
            conv_norm(channels, channels, 1, norm=norm, activation=activation)
            for _ in range(num_levels - 1)
        )
        self.top_down_blocks = nn.ModuleList(csp() for _ in range(num_levels - 1))
        # index i of the bottom-up modules works on the pair (finer i, coarser i + 1)
        self.downsample_convs = nn.ModuleList(
            conv_norm(channels, channels, 3, stride=2, norm=norm, activation=activation)
            for _ in range(num_levels - 1)
        )
        self.bottom_up_blocks = nn.ModuleList(csp() for _ in range(num_levels - 1))

    def forward(
        self, maps: Sequence[torch.Tensor], valid: Optional[Sequence[torch.Tensor]] = None
    ) -> List[torch.Tensor]:
        """
        Args:
            maps: L tensors (B, C, h_l, w_l), finest first, each level the previous one
                halved (rounded up).
            valid: optional L tensors (B, 1, h_l, w_l), 1 on image cells and 0 on padding, in
                the maps' dtype: every input of a 3x3 conv is multiplied by its level's, so
                that no image cell's output depends on the padded cells.

        Returns:
            L tensors (B, C, h_l, w_l), finest first.
        """
        if len(maps) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} maps, got {len(maps)}")
        check_halving_shapes([tuple(m.shape[-2:]) for m in maps])

        def masked(index: int, x: torch.Tensor) -> torch.Tensor:
            return x if valid is None else x * valid[index]

        def level_valid(index: int) -> Optional[torch.Tensor]:
            return None if valid is None else valid[index]

        last = self.num_levels - 1
        top_down: List[torch.Tensor] = [maps[-1]] * self.num_levels
        coarser = maps[-1]
        for i, finer_index in enumerate(range(last - 1, -1, -1)):
            coarser = self.lateral_convs[i](coarser)
            top_down[finer_index + 1] = coarser
            finer = maps[finer_index]
            upsampled = F.interpolate(coarser, scale_factor=2.0, mode="nearest")
            upsampled = upsampled[:, :, : finer.shape[-2], : finer.shape[-1]]
            coarser = self.top_down_blocks[i](
                torch.cat([upsampled, finer], dim=1), level_valid(finer_index)
            )
        top_down[0] = coarser

        outputs = [top_down[0]]
        for i in range(last):
            downsampled = self.downsample_convs[i](masked(i, outputs[-1]))
            outputs.append(
                self.bottom_up_blocks[i](
                    torch.cat([downsampled, top_down[i + 1]], dim=1), level_valid(i + 1)
                )
            )
        return outputs
