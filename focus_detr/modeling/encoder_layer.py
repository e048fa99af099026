"""One Focus-DETR encoder layer: dual attention, deformable attention, FFN (post-norm)."""

from typing import Optional

import torch
from torch import nn

from ..layers.ms_deform_attn import MultiScaleDeformableAttention

__all__ = ["FocusEncoderLayer"]


class FocusEncoderLayer(nn.Module):
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
            embed_dim: token channels.
            num_heads: heads of both attentions.
            num_levels: feature levels sampled by the deformable attention.
            num_points: sampling points per head and level.
            ffn_dim: hidden width of the FFN.
            dropout: dropout after each attention and inside the FFN (Focus-DETR: 0).
            topk_sa: tokens per image in the dual self-attention; clamped to those available.
        """
        super().__init__()
        if ffn_dim <= 0:
            raise ValueError(f"ffn_dim must be positive, got {ffn_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if topk_sa <= 0:
            raise ValueError(f"topk_sa must be positive, got {topk_sa}")
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim must be a positive multiple of num_heads, got embed_dim={embed_dim}, "
                f"num_heads={num_heads}"
            )
        self.embed_dim = embed_dim
        self.topk_sa = topk_sa

        self.self_attn = nn.MultiheadAttention(
            embed_dim, num_heads, dropout=dropout, batch_first=True
        )
        self.self_attn_dropout = nn.Dropout(dropout)
        self.self_attn_norm = nn.LayerNorm(embed_dim)

        self.deformable_attn = MultiScaleDeformableAttention(
            embed_dim=embed_dim, num_heads=num_heads, num_levels=num_levels, num_points=num_points
        )
        self.deformable_dropout = nn.Dropout(dropout)
        self.deformable_norm = nn.LayerNorm(embed_dim)

        self.ffn = nn.Sequential(
            nn.Linear(embed_dim, ffn_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(ffn_dim, embed_dim),
            nn.Dropout(dropout),
        )
        self.ffn_norm = nn.LayerNorm(embed_dim)
        for module in self.ffn:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def dual_self_attention(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        scores: torch.Tensor,
        query_valid: torch.Tensor,
    ) -> torch.Tensor:
        """
        Self-attention among the best-scored valid tokens of each image.

        Args:
            query: (B, k, C) tokens of the layer.
            query_pos: (B, k, C) their position embeddings.
            scores: (B, k) fine-grained scores, only used for ranking (no gradient).
            query_valid: (B, k) bool, False for tokens beyond the image's budget: they are never
                attended to and never updated.

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

    def forward(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        value_padding_mask: Optional[torch.Tensor],
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        scores: torch.Tensor,
        query_valid: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            query: (B, k, C) selected tokens.
            query_pos: (B, k, C) their position embeddings.
            reference_points: (B, k, L, 2) their normalized reference points.
            value: (B, N, C) all flattened tokens, the deformable attention's value.
            value_padding_mask: (B, N) bool, True on padded value tokens, or None.
            spatial_shapes: (L, 2) int64 (h, w) of every level.
            level_start_index: (L,) int64 offset of every level in ``value``.
            scores: (B, k) fine-grained scores ranking the tokens for the dual attention.
            query_valid: (B, k) bool, False for tokens beyond the image's budget.

        Returns:
            (B, k, C) updated tokens (the caller writes back only the valid ones).
        """
        query = self.dual_self_attention(query, query_pos, scores, query_valid)
        attended = self.deformable_attn(
            query + query_pos,
            reference_points,
            value,
            spatial_shapes,
            level_start_index,
            value_padding_mask,
        )
        query = self.deformable_norm(query + self.deformable_dropout(attended))
        return self.ffn_norm(query + self.ffn(query))
