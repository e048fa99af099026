"""The Lite DETR encoder: high-level tokens updated more often than low-level ones."""

from typing import List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..multi_scale import encoder_reference_points
from ..structures import EncoderOutput, FlattenedFeatures
from .deformable_layer import DeformableEncoder, DeformableEncoderLayer, feedforward

__all__ = ["LiteEncoder", "LiteAllLevelLayer"]


class LiteAllLevelLayer(DeformableEncoderLayer):
    """
    Lite DETR's all-level update: every token is a query of the deformable attention; then
    high-level tokens go through the full FFN and low-level tokens through a small one
    (``embed_dim -> low_ffn_dim -> embed_dim``).
    """

    def __init__(self, *, low_ffn_dim: int = 256, dropout: float = 0.0, **kwargs):
        """
        Args:
            low_ffn_dim: hidden width of the low-level tokens' FFN (Lite DETR: ``embed_dim``).
            dropout, kwargs: see :class:`DeformableEncoderLayer`.
        """
        super().__init__(dropout=dropout, **kwargs)
        self.low_ffn = feedforward(self.embed_dim, low_ffn_dim, dropout)
        self.low_ffn_norm = nn.LayerNorm(self.embed_dim)

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        value_padding_mask: Optional[torch.Tensor],
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        num_low_tokens: int,
        *,
        level_shapes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> torch.Tensor:
        """
        As :meth:`DeformableEncoderLayer.forward` with ``query`` = all N tokens, the first
        ``num_low_tokens`` of which are low-level.
        """
        query = self.deformable_update(
            query,
            query_pos,
            reference_points,
            value,
            value_padding_mask,
            spatial_shapes,
            level_start_index,
            level_shapes=level_shapes,
        )
        low, high = query[:, :num_low_tokens], query[:, num_low_tokens:]
        low = self.low_ffn_norm(low + self.low_ffn(low))
        high = self.ffn_norm(high + self.ffn(high))
        return torch.cat([low, high], dim=1)


class LiteEncoder(DeformableEncoder):
    """
    Lite DETR ("Lite DETR: An Interleaved Multi-Scale Encoder for Efficient DETR", CVPR 2023).
    The levels split into high-level (the ``num_high_levels`` coarsest, e.g. strides 16/32/64)
    and low-level (the finest, stride 8) tokens. The schedule is named HxLy-(A+1)xB, as in the
    paper and its code: a block updates the high-level tokens A times and the low-level tokens
    once; its last layer is the all-level layer (every token is a query, low-level tokens take a
    small FFN), which makes both the A-th high-level update and the "+1" low-level one. A block
    is thus ``A - 1`` high-level-only layers (queries: high-level tokens; keys and values: the
    current memory of all levels) and one all-level layer, ``A * B`` layers in all:
    H3L1-(2+1)x3 = [high, all] x 3 and H3L1-(6+1)x1 = [high] x 5 + [all], 6 layers each like
    DINO's encoder. Optional key-aware deformable attention (weights from the query and the
    sampled keys). It has no loss of its own.
    """

    def __init__(
        self,
        *,
        low_ffn_dim: int = 256,
        num_high_levels: int = 3,
        high_updates_per_block: int = 2,
        num_blocks: int = 3,
        key_aware: bool = False,
        **kwargs,
    ):
        """
        Args:
            low_ffn_dim: hidden width of the low-level FFN in the all-level layers (Lite DETR:
                ``embed_dim``).
            num_high_levels: coarsest levels treated as high-level (H3L1: 3), in [1, L - 1].
            high_updates_per_block: A in (A+1)xB, >= 1: the high-level updates of a block,
                counting the one its all-level layer makes (Lite DETR: 2 with 3 blocks, or 6
                with 1 block).
            num_blocks: B in (A+1)xB.
            key_aware: key-aware deformable attention in every layer (Lite DETR's model; its
                code then makes the decoder's cross-attention key-aware too, see
                ``DINODecoder(key_aware=...)``).
            kwargs: ``embed_dim``, ``num_heads``, ``num_levels``, ``num_points``, ``ffn_dim``,
                ``dropout``: see :class:`DeformableEncoder` (the layer count follows from the
                blocks: ``num_blocks * high_updates_per_block``).
        """
        if "num_layers" in kwargs:
            raise ValueError(
                f"LiteEncoder takes no num_layers (got {kwargs['num_layers']}): it has "
                "num_blocks * high_updates_per_block layers"
            )
        if high_updates_per_block < 1:
            raise ValueError(
                f"high_updates_per_block (A in (A+1)xB, counting the all-level layer) must be "
                f">= 1, got {high_updates_per_block}"
            )
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        schedule = (["high"] * (high_updates_per_block - 1) + ["all"]) * num_blocks
        super().__init__(num_layers=len(schedule), **kwargs)
        num_levels = self.num_levels
        if not 1 <= num_high_levels < num_levels:
            raise ValueError(
                f"num_high_levels must be in [1, num_levels - 1] = [1, {num_levels - 1}], got "
                f"{num_high_levels}"
            )
        self.num_high_levels = num_high_levels
        self.high_updates_per_block = high_updates_per_block
        self.num_blocks = num_blocks
        self.key_aware = key_aware
        self.schedule: List[str] = schedule
        common = dict(key_aware=key_aware, **self.layer_args)
        self.layers = nn.ModuleList(
            (
                LiteAllLevelLayer(low_ffn_dim=low_ffn_dim, **common)
                if kind == "all"
                else DeformableEncoderLayer(**common)
            )
            for kind in self.schedule
        )

    def updated_levels(self) -> List[List[int]]:
        """For every layer, the levels whose tokens it updates (finest level is 0)."""
        high = list(range(self.num_levels - self.num_high_levels, self.num_levels))
        return [list(range(self.num_levels)) if kind == "all" else high for kind in self.schedule]

    def forward(
        self, features: FlattenedFeatures, shared_heads: Mapping[str, nn.Module]
    ) -> EncoderOutput:
        """
        Args:
            features: flattened tokens and geometry.
            shared_heads: unused.

        Returns:
            :class:`EncoderOutput` with ``memory`` (B, N, C); high-level layers report the
            indices of the high-level tokens, all-level layers None.
        """
        self.check_features(features)
        num_low = features.level_starts[self.num_levels - self.num_high_levels]
        batch, num_tokens, _ = features.tokens.shape
        reference = encoder_reference_points(features)
        high_reference, high_pos = reference[:, num_low:], features.pos[:, num_low:]
        high_indices = torch.arange(num_low, num_tokens, device=features.tokens.device)
        high_indices = high_indices[None].expand(batch, -1)
        high_valid = ~features.padding_mask[:, num_low:]
        memory = features.tokens
        layer_indices: List[Optional[torch.Tensor]] = []
        layer_valid: List[Optional[torch.Tensor]] = []
        geometry = (features.padding_mask, features.spatial_shapes, features.level_start_index)
        level_shapes = features.level_shapes
        for kind, layer in zip(self.schedule, self.layers):
            if kind == "all":
                memory = layer(
                    memory,
                    features.pos,
                    reference,
                    memory,
                    *geometry,
                    num_low,
                    level_shapes=level_shapes,
                )
                layer_indices.append(None)
                layer_valid.append(None)
            else:
                high = layer(
                    memory[:, num_low:],
                    high_pos,
                    high_reference,
                    memory,
                    *geometry,
                    level_shapes=level_shapes,
                )
                memory = torch.cat([memory[:, :num_low], high], dim=1)
                layer_indices.append(high_indices)
                layer_valid.append(high_valid)
        return EncoderOutput(memory=memory, layer_indices=layer_indices, layer_valid=layer_valid)

    def extra_repr(self) -> str:
        return (
            f"H{self.num_high_levels}L{self.num_levels - self.num_high_levels}-"
            f"({self.high_updates_per_block}+1)x{self.num_blocks}, key_aware={self.key_aware}"
        )
