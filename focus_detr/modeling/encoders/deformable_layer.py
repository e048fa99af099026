"""The deformable encoder layer shared by every encoder: deformable attention, then an FFN."""

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ...layers import MultiScaleDeformableAttention
from .base import DETREncoder

__all__ = ["DeformableEncoder", "DeformableEncoderLayer", "feedforward"]


def feedforward(embed_dim: int, hidden_dim: int, dropout: float) -> nn.Sequential:
    """``Linear(C, hidden) -> ReLU -> Dropout -> Linear(hidden, C) -> Dropout``, Xavier init."""
    if hidden_dim <= 0:
        raise ValueError(f"the FFN hidden size must be positive, got {hidden_dim}")
    ffn = nn.Sequential(
        nn.Linear(embed_dim, hidden_dim),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden_dim, embed_dim),
        nn.Dropout(dropout),
    )
    for module in ffn:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    return ffn


class DeformableEncoderLayer(nn.Module):
    """
    Post-norm deformable encoder layer (Deformable DETR, DINO):

    1. multi-scale deformable attention, ``query = q + p``, on the value the encoder chooses
       (the current memory or the initial tokens), plus residual, then LN;
    2. FFN ``C -> ffn_dim -> C`` (ReLU) plus residual, then LN.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
        key_aware: bool = False,
    ):
        """
        Args:
            embed_dim: token channels.
            num_heads: attention heads.
            num_levels: feature levels sampled by the deformable attention.
            num_points: sampling points per head and level.
            ffn_dim: hidden width of the FFN.
            dropout: dropout after the attention and inside the FFN.
            key_aware: use Lite DETR's key-aware deformable attention (weights from the query
                and the sampled keys) instead of weights predicted from the query alone.
        """
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim must be a positive multiple of num_heads, got embed_dim={embed_dim}, "
                f"num_heads={num_heads}"
            )
        self.embed_dim = embed_dim
        attention_cls = MultiScaleDeformableAttention
        if key_aware:
            from ...layers import KeyAwareDeformableAttention

            attention_cls = KeyAwareDeformableAttention
        self.deformable_attn = attention_cls(
            embed_dim=embed_dim, num_heads=num_heads, num_levels=num_levels, num_points=num_points
        )
        self.deformable_dropout = nn.Dropout(dropout)
        self.deformable_norm = nn.LayerNorm(embed_dim)
        self.ffn = feedforward(embed_dim, ffn_dim, dropout)
        self.ffn_norm = nn.LayerNorm(embed_dim)

    def deformable_update(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        value_padding_mask: Optional[torch.Tensor],
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        *,
        level_shapes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> torch.Tensor:
        """``LN(q + DeformAttn(q + p, value))``: (B, k, C)."""
        attended = self.deformable_attn(
            query + query_pos,
            reference_points,
            value,
            spatial_shapes,
            level_start_index,
            value_padding_mask,
            level_shapes=level_shapes,
        )
        return self.deformable_norm(query + self.deformable_dropout(attended))

    def forward(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        value_padding_mask: Optional[torch.Tensor],
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        *,
        level_shapes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (B, k, C) tokens to update.
            query_pos: (B, k, C) their position embeddings.
            reference_points: (B, k, L, 2) their normalized reference points on every level.
            value: (B, N, C) all flattened tokens, the deformable attention's value.
            value_padding_mask: (B, N) bool, True on padded value tokens, or None.
            spatial_shapes: (L, 2) int64 (h, w) of every level.
            level_start_index: (L,) int64 offset of every level in ``value``.
            level_shapes: the contents of ``spatial_shapes`` as Python ints
                (``FlattenedFeatures.level_shapes``): the tensors are then not read back.

        Returns:
            (B, k, C) updated tokens.
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
        return self.ffn_norm(query + self.ffn(query))


class DeformableEncoder(DETREncoder):
    """
    Base of the encoders built of :class:`DeformableEncoderLayer` (dense DINO, Focus, Sparse
    DETR, Lite DETR): the constructor arguments they share, stated once. Subclasses build their
    layers with ``**self.layer_args`` (plus their own options).
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
            embed_dim: C, token channels.
            num_layers: encoder layers.
            num_heads: attention heads of every layer.
            num_levels: feature levels sampled by the deformable attention.
            num_points: sampling points per head and level.
            ffn_dim: hidden width of the layers' FFN.
            dropout: dropout after the attention and inside the FFN.
        """
        super().__init__(embed_dim=embed_dim, num_levels=num_levels, num_layers=num_layers)
        self.layer_args: Dict[str, Any] = dict(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_levels=num_levels,
            num_points=num_points,
            ffn_dim=ffn_dim,
            dropout=dropout,
        )
