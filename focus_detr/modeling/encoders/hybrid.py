"""RT-DETR's hybrid encoder: attention on the coarsest map (AIFI), convolutional fusion (CCFF)."""

from typing import List, Mapping, Optional, Sequence

import torch
from torch import nn

from ..structures import EncoderOutput, FlattenedFeatures
from .aifi import POSITION_LAYOUTS, AIFILayer, sincos_position_embedding_2d
from .base import DETREncoder
from .ccff import CrossScaleFusion, check_halving_shapes

__all__ = ["HYBRID_PADDING_MODES", "HybridEncoder"]

# "visible" (RT-DETR): padded tokens are attended to and convolved like image tokens;
# "masked": AIFI ignores padded keys and the fusion's 3x3 convs see zeros on padded cells.
HYBRID_PADDING_MODES = ("visible", "masked")


class HybridEncoder(DETREncoder):
    """
    The hybrid encoder of RT-DETR ("DETRs Beat YOLOs on Real-time Object Detection", CVPR 2024)
    on the package's flattened features (the input projection of RT-DETR is the neck):

    1. AIFI: ``num_aifi_layers`` :class:`AIFILayer` on the tokens of each level of
       ``aifi_levels`` (RT-DETR: one layer on the coarsest, stride-32 map), with a fixed 2-D
       sin-cos position embedding computed for the map's size (the features' ``pos``, the
       sine embedding plus level embedding of the other encoders, is not used);
    2. CCFF: :class:`CrossScaleFusion` of the L maps, top-down then bottom-up, with CSP layers
       of RepVGG blocks, BatchNorm and SiLU.

    The memory is the fused maps flattened back level after level. Per "layer" the output
    reports which tokens were rewritten (``layer_indices``): each AIFI layer the tokens of its
    level, the top-down pass every token (None), the bottom-up pass every token but the
    finest level's. It has no loss of its own.

    BatchNorm normalizes with the statistics of the training batch (padding included), as in
    RT-DETR; in eval mode with running statistics.

    It declares ``uses_position_embedding = False`` (the model then builds neither the sine
    embedding nor the level embedding) and ``keeps_own_init = True`` (PyTorch's default
    initialisation of its convolutions, norms and attention layer, as in RT-DETR, also under
    the model's reference Xavier initialisation).
    """

    has_keep_ratio = False
    uses_position_embedding = False
    keeps_own_init = True

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_levels: int = 3,
        aifi_levels: Sequence[int] = (-1,),
        num_aifi_layers: int = 1,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        aifi_activation: str = "gelu",
        pe_temperature: float = 10000.0,
        num_blocks: int = 3,
        expansion: float = 1.0,
        norm: str = "BN",
        activation: str = "silu",
        position_layout: str = "column_major",
        padding: str = "visible",
    ):
        """
        Args:
            embed_dim: token channels (RT-DETR's ``hidden_dim``); a multiple of 4.
            num_levels: L >= 2 levels, finest first, each the previous one halved (rounded up).
            aifi_levels: levels AIFI runs on (negative counts from the coarsest; RT-DETR's
                ``use_encoder_idx``, default the coarsest).
            num_aifi_layers: AIFI layers per such level (RT-DETR: 1; 0 = no AIFI).
            num_heads, ffn_dim, dropout, aifi_activation: of every :class:`AIFILayer`
                (RT-DETR: 8, 1024, 0.0, "gelu").
            pe_temperature: of the sin-cos position embedding (RT-DETR: 10000).
            num_blocks, expansion, norm, activation: of the fusion (RT-DETR: 3 RepVGG blocks
                per CSP layer at ``depth_mult=1``, 1.0, "BN", "silu").
            position_layout: one of :data:`~focus_detr.modeling.encoders.aifi.POSITION_LAYOUTS`:
                "column_major" (RT-DETR: right on square maps only) or "row_major" (every cell
                its own row and column; RT-DETR's embedding on square maps). See
                :func:`~focus_detr.modeling.encoders.aifi.sincos_position_embedding_2d`.
            padding: one of :data:`HYBRID_PADDING_MODES`: "visible" (RT-DETR, which has no
                padding masks) or "masked" (in eval mode an image's output does not depend on
                the images it is batched with, given ``position_layout="row_major"``).
        """
        # AIFI layers on each of its levels, then the top-down and the bottom-up pass
        num_layers = len(aifi_levels) * max(num_aifi_layers, 0) + 2
        super().__init__(embed_dim=embed_dim, num_levels=num_levels, num_layers=num_layers)
        if num_levels < 2:
            raise ValueError(f"the hybrid encoder needs num_levels >= 2, got {num_levels}")
        levels = [level + num_levels if level < 0 else level for level in aifi_levels]
        if any(not 0 <= level < num_levels for level in levels) or len(set(levels)) < len(levels):
            raise ValueError(
                f"aifi_levels {list(aifi_levels)} must be distinct levels of {num_levels}"
            )
        if num_aifi_layers < 0:
            raise ValueError(f"num_aifi_layers must be >= 0, got {num_aifi_layers}")
        if embed_dim % 4 != 0:
            raise ValueError(f"embed_dim must be a multiple of 4, got {embed_dim}")
        if position_layout not in POSITION_LAYOUTS:
            raise ValueError(
                f"position_layout must be one of {POSITION_LAYOUTS}, got {position_layout!r}"
            )
        if padding not in HYBRID_PADDING_MODES:
            raise ValueError(f"padding must be one of {HYBRID_PADDING_MODES}, got {padding!r}")
        self.aifi_levels = sorted(levels) if num_aifi_layers > 0 else []
        self.pe_temperature = pe_temperature
        self.position_layout = position_layout
        self.padding = padding
        self.aifi = nn.ModuleList(
            nn.ModuleList(
                AIFILayer(
                    embed_dim=embed_dim,
                    num_heads=num_heads,
                    ffn_dim=ffn_dim,
                    dropout=dropout,
                    activation=aifi_activation,
                )
                for _ in range(num_aifi_layers)
            )
            for _ in self.aifi_levels
        )
        self.fusion = CrossScaleFusion(
            channels=embed_dim,
            num_levels=num_levels,
            num_blocks=num_blocks,
            expansion=expansion,
            norm=norm,
            activation=activation,
        )

    def forward(
        self, features: FlattenedFeatures, shared_heads: Mapping[str, nn.Module]
    ) -> EncoderOutput:
        """
        Args:
            features: flattened tokens and geometry (``pos`` unused, None in the model).
            shared_heads: unused (the hybrid encoder needs none).

        Returns:
            :class:`EncoderOutput` with ``memory`` (B, N, C) and ``num_layers`` entries of
            ``layer_indices``: (B, h_l * w_l) token indices of the AIFI level per AIFI layer,
            None for the top-down pass, (B, N - h_0 * w_0) for the bottom-up pass.
        """
        self.check_features(features)
        check_halving_shapes(features.level_shapes)
        batch, num_tokens, channels = features.tokens.shape
        masked = self.padding == "masked"
        level_tokens = list(features.split_levels(features.tokens))
        level_padding = features.split_levels(features.padding_mask)
        for level, layers in zip(self.aifi_levels, self.aifi):
            height, width = features.level_shapes[level]
            pos = sincos_position_embedding_2d(
                height,
                width,
                channels,
                temperature=self.pe_temperature,
                layout=self.position_layout,
                dtype=features.tokens.dtype,
                device=features.tokens.device,
            )
            key_padding_mask = level_padding[level] if masked else None
            for layer in layers:
                level_tokens[level] = layer(level_tokens[level], pos, key_padding_mask)

        # (B, h*w, C) -> (B, C, h, w) channels-last views, and back, without copies
        maps = [
            tokens.view(batch, height, width, channels).permute(0, 3, 1, 2)
            for tokens, (height, width) in zip(level_tokens, features.level_shapes)
        ]
        valid = None
        if masked:
            valid = [
                (~mask).view(batch, 1, height, width).to(features.tokens.dtype)
                for mask, (height, width) in zip(level_padding, features.level_shapes)
            ]
        fused = self.fusion(maps, valid)
        memory = torch.cat([m.permute(0, 2, 3, 1).reshape(batch, -1, channels) for m in fused], 1)
        return EncoderOutput(
            memory=memory,
            layer_indices=self._updated_tokens(features),
            layer_valid=[None] * self.num_layers,
        )

    def _updated_tokens(self, features: FlattenedFeatures) -> List[Optional[torch.Tensor]]:
        """``layer_indices``: the AIFI levels' tokens, then None (top-down: every token),
        then every token after the finest level (bottom-up)."""
        batch, num_tokens = features.padding_mask.shape
        device = features.padding_mask.device
        starts, sizes = features.level_starts, features.level_sizes

        def token_range(start: int, end: int) -> torch.Tensor:
            return torch.arange(start, end, device=device).expand(batch, -1)

        indices: List[Optional[torch.Tensor]] = []
        for level, layers in zip(self.aifi_levels, self.aifi):
            level_range = token_range(starts[level], starts[level] + sizes[level])
            indices.extend(level_range for _ in layers)
        indices.append(None)
        indices.append(token_range(sizes[0], num_tokens))
        return indices
