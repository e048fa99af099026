"""DINO decoder: deformable cross-attention to reference boxes, look-forward-twice refinement."""

from typing import Optional, Tuple

import torch
from torch import nn

from ..layers import MultiScaleDeformableAttention
from .position_encoding import get_sine_pos_embed
from .utils import MLP, check_box_frame, clone_modules, detection_heads, inverse_sigmoid

__all__ = ["DINODecoderLayer", "DINODecoder"]


class DINODecoderLayer(nn.Module):
    """
    Post-norm decoder layer: self-attention -> add & LN -> multi-scale deformable
    cross-attention -> add & LN -> FFN -> add & LN.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_heads: int = 8,
        feedforward_dim: int = 2048,
        dropout: float = 0.0,
        num_levels: int = 4,
        num_points: int = 4,
    ):
        """
        Args:
            embed_dim: C, query channels.
            num_heads: heads of both attentions.
            feedforward_dim: hidden width of the FFN.
            dropout: dropout after each sub-layer and inside the FFN.
            num_levels: feature levels of the memory.
            num_points: sampling points per head and level.
        """
        super().__init__()
        if feedforward_dim <= 0:
            raise ValueError(f"feedforward_dim must be positive, got {feedforward_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.self_attn = nn.MultiheadAttention(
            embed_dim, num_heads, dropout=dropout, batch_first=True
        )
        self.norm1 = nn.LayerNorm(embed_dim)
        self.cross_attn = MultiScaleDeformableAttention(
            embed_dim=embed_dim, num_heads=num_heads, num_levels=num_levels, num_points=num_points
        )
        self.norm2 = nn.LayerNorm(embed_dim)
        self.ffn = nn.Sequential(
            nn.Linear(embed_dim, feedforward_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(feedforward_dim, embed_dim),
        )
        self.norm3 = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        queries: torch.Tensor,
        query_pos: torch.Tensor,
        reference_boxes: torch.Tensor,
        memory: torch.Tensor,
        memory_padding_mask: Optional[torch.Tensor],
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        self_attn_mask: Optional[torch.Tensor] = None,
        self_attn_key_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            queries: (B, Q, C) content.
            query_pos: (B, Q, C) position embedding of the current boxes.
            reference_boxes: (B, Q, L, 4) cxcywh per level, in the memory's sampling frame.
            memory: (B, N, C) encoder output.
            memory_padding_mask: (B, N) bool, True on padding, or None.
            spatial_shapes: (L, 2) int64 (h, w).
            level_start_index: (L,) int64.
            self_attn_mask: (Q, Q) bool, True = blocked, or None.
            self_attn_key_padding_mask: (B, Q) bool, True = no query may attend to it, or None.

        Returns:
            (B, Q, C) updated queries.
        """
        qk = queries + query_pos
        attended = self.self_attn(
            qk,
            qk,
            queries,
            attn_mask=self_attn_mask,
            key_padding_mask=self_attn_key_padding_mask,
            need_weights=False,
        )[0]
        queries = self.norm1(queries + self.dropout(attended))
        attended = self.cross_attn(
            queries + query_pos,
            reference_boxes,
            memory,
            spatial_shapes,
            level_start_index,
            memory_padding_mask,
        )
        queries = self.norm2(queries + self.dropout(attended))
        return self.norm3(queries + self.dropout(self.ffn(queries)))


class DINODecoder(nn.Module):
    """
    A stack of :class:`DINODecoderLayer` with per-layer class and box heads. Every layer
    predicts a box delta in inverse-sigmoid space on top of the previous layer's box. The box
    handed to the next layer is detached, but the box a layer *outputs* is built on the
    undetached previous box ("look forward twice"), so the loss of layer i also trains the box
    head of layer i - 1.
    """

    def __init__(
        self,
        *,
        num_layers: int = 6,
        embed_dim: int = 256,
        num_heads: int = 8,
        feedforward_dim: int = 2048,
        dropout: float = 0.0,
        num_levels: int = 4,
        num_points: int = 4,
        num_classes: int = 80,
        frame: str = "valid",
        prior_prob: float = 0.01,
    ):
        """
        Args:
            num_layers: D, decoder layers (all are returned).
            embed_dim: C, query channels; must be even (sine embedding of C/2 per coordinate).
            num_heads: attention heads.
            feedforward_dim: FFN hidden width.
            dropout: dropout of every layer.
            num_levels: feature levels of the memory.
            num_points: sampling points per head and level.
            num_classes: K, outputs of every class head.
            frame: "valid" (the package's convention): boxes are relative to each image's
                valid region (Deformable DETR, DINO) and are multiplied by ``valid_ratios`` per
                level before sampling; "padded": boxes are relative to the padded image and
                sampled as they are. Must match the frame of the targets and of the query
                selection.
            prior_prob: initial foreground probability of the class heads.
        """
        super().__init__()
        if num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        if embed_dim <= 0 or embed_dim % 2 != 0:
            raise ValueError(f"embed_dim must be a positive even number, got {embed_dim}")
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        check_box_frame(frame)
        self.num_layers = num_layers
        self.embed_dim = embed_dim
        self.num_levels = num_levels
        self.num_classes = num_classes
        self.frame = frame
        layer = DINODecoderLayer(
            embed_dim=embed_dim,
            num_heads=num_heads,
            feedforward_dim=feedforward_dim,
            dropout=dropout,
            num_levels=num_levels,
            num_points=num_points,
        )
        self.layers = clone_modules(layer, num_layers)
        # sine embedding of (cx, cy, w, h): C/2 features each -> 2C
        self.ref_point_head = MLP(2 * embed_dim, embed_dim, embed_dim, 2)
        self.norm = nn.LayerNorm(embed_dim)
        class_head, box_head = detection_heads(embed_dim, num_classes, prior_prob)
        self.class_heads = clone_modules(class_head, num_layers)
        self.box_heads = clone_modules(box_head, num_layers)

    def forward(
        self,
        queries: torch.Tensor,
        reference_boxes: torch.Tensor,
        memory: torch.Tensor,
        memory_padding_mask: Optional[torch.Tensor],
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        self_attn_mask: Optional[torch.Tensor] = None,
        self_attn_key_padding_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            queries: (B, Q, C) content queries (denoising queries first, if any).
            reference_boxes: (B, Q, 4) initial cxcywh boxes in sigmoid space (detached).
            memory: (B, N, C) encoder output.
            memory_padding_mask: (B, N) bool, True on padding, or None.
            spatial_shapes: (L, 2) int64 (h, w).
            level_start_index: (L,) int64.
            valid_ratios: (B, L, 2) (valid_w / w, valid_h / h); used in the "valid" frame only.
            self_attn_mask: (Q, Q) bool, True = blocked, or None.
            self_attn_key_padding_mask: (B, Q) bool, True on queries nobody may attend to
                (padding slots of the denoising queries), or None.

        Returns:
            ``(class_logits (D, B, Q, K), boxes (D, B, Q, 4))``, boxes cxcywh in [0, 1].
        """
        reference = reference_boxes.detach()
        previous_box = reference  # the previous layer's box with gradient (layer 0: the input)
        all_logits, all_boxes = [], []
        for layer, class_head, box_head in zip(self.layers, self.class_heads, self.box_heads):
            if self.frame == "valid":
                scale = torch.cat([valid_ratios, valid_ratios], dim=-1)  # (B, L, 4)
                level_boxes = reference[:, :, None, :] * scale[:, None, :, :]
            else:
                level_boxes = reference[:, :, None, :].expand(-1, -1, spatial_shapes.shape[0], -1)
            query_pos = self.ref_point_head(
                get_sine_pos_embed(level_boxes[:, :, 0, :], self.embed_dim // 2).to(queries.dtype)
            )
            queries = layer(
                queries,
                query_pos,
                level_boxes,
                memory,
                memory_padding_mask,
                spatial_shapes,
                level_start_index,
                self_attn_mask,
                self_attn_key_padding_mask,
            )
            normed = self.norm(queries)
            delta = box_head(normed)
            # the output box is built on the previous layer's undetached box: its loss reaches
            # this layer's head and the previous one (not further: see ``previous_box`` below)
            all_boxes.append((delta + inverse_sigmoid(previous_box)).sigmoid())
            all_logits.append(class_head(normed))
            # same value as the output box, but with gradient through this layer's delta only
            previous_box = (delta + inverse_sigmoid(reference)).sigmoid()
            # the next layer samples around this box; its gradient stops here
            reference = previous_box.detach()
        return torch.stack(all_logits), torch.stack(all_boxes)
