"""One Focus-DETR encoder layer: dual attention, then the deformable layer (post-norm)."""

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .deformable_layer import DeformableEncoderLayer

__all__ = ["FocusEncoderLayer"]


class FocusEncoderLayer(DeformableEncoderLayer):
    """
    Updates the tokens an encoder layer selected:

    1. dual attention: the ``topk_sa`` best tokens of each image (by a fine-grained score) attend
       to each other, ``q' = LN(q + MHSA(q + p, q + p, q))``, and are written back;
    2. deformable attention, ``query = q + p``, on the value given by the encoder, plus residual,
       then LN;
    3. FFN ``C -> ffn_dim -> C`` (ReLU) plus residual, then LN.
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
        topk_sa: int = 300,
    ):
        """
        Args:
            embed_dim, num_heads, num_levels, num_points, ffn_dim, dropout: see
                :class:`DeformableEncoderLayer`; ``num_heads`` also for the dual attention.
            topk_sa: tokens per image in the dual self-attention; clamped to those available.
        """
        super().__init__(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_levels=num_levels,
            num_points=num_points,
            ffn_dim=ffn_dim,
            dropout=dropout,
        )
        if topk_sa <= 0:
            raise ValueError(f"topk_sa must be positive, got {topk_sa}")
        self.topk_sa = topk_sa
        self.self_attn = nn.MultiheadAttention(
            embed_dim, num_heads, dropout=dropout, batch_first=True
        )
        self.self_attn_dropout = nn.Dropout(dropout)
        self.self_attn_norm = nn.LayerNorm(embed_dim)

    def dual_self_attention(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        scores: torch.Tensor,
        query_valid: torch.Tensor,
    ) -> torch.Tensor:
        """
        Self-attention among the best-scored candidate tokens of each image.

        Args:
            query: (B, k, C) tokens of the layer.
            query_pos: (B, k, C) their position embeddings.
            scores: (B, k) fine-grained scores, only used for ranking (no gradient).
            query_valid: (B, k) bool, the candidates (see :class:`FocusEncoder`'s
                ``padded_batches``: the tokens the image writes back, or every token the layer
                gathered); the others are never attended to and never updated.

        Returns:
            (B, k, C) tokens, the selected valid ones replaced by ``LN(q + MHSA)``.
        """
        batch, num_tokens, channels = query.shape
        num_selected = min(self.topk_sa, num_tokens)
        ranking = scores.detach().masked_fill(~query_valid, float("-inf"))
        selected = ranking.topk(num_selected, dim=1).indices  # (B, s), valid tokens first
        # an image has min(s, its valid count) selected tokens, all of them ranked first
        num_valid = query_valid.sum(dim=1, keepdim=True).clamp(max=num_selected)
        selected_valid = torch.arange(num_selected, device=query.device)[None, :] < num_valid
        # never mask every key of a row (softmax over nothing is nan, also in the backward pass);
        # rows of images without a valid token are discarded below anyway
        key_padding_mask = ~selected_valid
        key_padding_mask[:, 0] = False

        gather_index = selected.unsqueeze(-1).expand(-1, -1, channels)
        selected_query = query.gather(1, gather_index)
        selected_pos = query_pos.gather(1, gather_index)
        with_pos = selected_query + selected_pos
        attended = self.self_attn(
            with_pos,
            with_pos,
            selected_query,
            key_padding_mask=key_padding_mask,
            need_weights=False,
        )[0]
        updated = self.self_attn_norm(selected_query + self.self_attn_dropout(attended))
        updated = torch.where(selected_valid.unsqueeze(-1), updated, selected_query)
        return query.scatter(1, gather_index, updated)

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        value_padding_mask,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        scores: torch.Tensor,
        query_valid: torch.Tensor,
        *,
        level_shapes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> torch.Tensor:
        """
        Args:
            query, query_pos, reference_points, value, value_padding_mask, spatial_shapes,
                level_start_index, level_shapes: see :meth:`DeformableEncoderLayer.forward`.
            scores: (B, k) fine-grained scores ranking the tokens for the dual attention.
            query_valid: (B, k) bool, the dual attention's candidates.

        Returns:
            (B, k, C) updated tokens (the caller writes back only the valid ones).
        """
        query = self.dual_self_attention(query, query_pos, scores, query_valid)
        return super().forward(
            query,
            query_pos,
            reference_points,
            value,
            value_padding_mask,
            spatial_shapes,
            level_start_index,
            level_shapes=level_shapes,
        )
