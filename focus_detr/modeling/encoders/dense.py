"""The dense deformable encoder of Deformable DETR and DINO: every layer updates every token."""

from typing import Mapping

from torch import nn

from ..multi_scale import encoder_reference_points
from ..structures import EncoderOutput, FlattenedFeatures
from .deformable_layer import DeformableEncoder, DeformableEncoderLayer

__all__ = ["DenseEncoder"]


class DenseEncoder(DeformableEncoder):
    """
    The DINO baseline (Deformable DETR's encoder, "DINO: DETR with Improved DeNoising Anchor Boxes",
    ICLR 2023): ``num_layers`` deformable layers, each updating all N tokens with deformable
    self-attention whose value is the current memory. It keeps nothing out and has no loss of
    its own: the cost every efficient encoder is measured against.
    """

    def __init__(self, **kwargs):
        """
        Args:
            kwargs: ``embed_dim``, ``num_layers`` (DINO: 6), ``num_heads``, ``num_levels``,
                ``num_points``, ``ffn_dim``, ``dropout``: see :class:`DeformableEncoder`.
        """
        super().__init__(**kwargs)
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(**self.layer_args) for _ in range(self.num_layers)
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
                level_shapes=features.level_shapes,
            )
        return EncoderOutput(
            memory=memory,
            layer_indices=[None] * self.num_layers,
            layer_valid=[None] * self.num_layers,
        )
