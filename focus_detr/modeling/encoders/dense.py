"""The dense deformable encoder of Deformable DETR and DINO: every layer updates every token."""

from typing import Mapping

from torch import nn

from ..multi_scale import encoder_reference_points
from ..structures import EncoderOutput, FlattenedFeatures
from .base import DETREncoder
from .deformable_layer import DeformableEncoderLayer

__all__ = ["DenseEncoder"]


class DenseEncoder(DETREncoder):
    """
    The DINO baseline (Deformable DETR's encoder, "DINO: DETR with Improved DeNoising Anchor Boxes",
    ICLR 2023): ``num_layers`` deformable layers, each updating all N tokens with deformable
    self-attention whose value is the current memory. It keeps nothing out and has no loss of
    its own: the cost every efficient encoder is measured against.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_layers: int = 6,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
    ):
        """
        Args:
            embed_dim, num_heads, num_levels, num_points, ffn_dim, dropout: see
                :class:`DeformableEncoderLayer`.
            num_layers: encoder layers (DINO: 6).
        """
        super().__init__()
        if num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.num_levels = num_levels
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(
                embed_dim=embed_dim,
                num_heads=num_heads,
                num_levels=num_levels,
                num_points=num_points,
                ffn_dim=ffn_dim,
                dropout=dropout,
            )
            for _ in range(num_layers)
        )

    def forward(
        self, features: FlattenedFeatures, shared_heads: Mapping[str, nn.Module]
    ) -> EncoderOutput:
        """
        Args:
            features: flattened tokens and geometry.
            shared_heads: unused (the dense encoder needs none).

        Returns:
            :class:`EncoderOutput` with ``memory`` (B, N, C); every layer updated every token
            (``layer_indices`` entries are None).
        """
        self.check_features(features)
        reference_points = encoder_reference_points(features)
        memory = features.tokens
        for layer in self.layers:
            memory = layer(
                memory,
                features.pos,
                reference_points,
                memory,
                features.padding_mask,
                features.spatial_shapes,
                features.level_start_index,
            )
        return EncoderOutput(
            memory=memory,
            layer_indices=[None] * self.num_layers,
            layer_valid=[None] * self.num_layers,
        )
