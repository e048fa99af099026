"""DINO decoder: deformable cross-attention to reference boxes, look-forward-twice refinement."""

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..layers import KeyAwareDeformableAttention, MultiScaleDeformableAttention
from .box_ops import inverse_sigmoid
from .heads import box_mlp, clone_modules, detection_heads
from .position_encoding import get_sine_pos_embed
from .structures import DecoderOutput, FlattenedFeatures

__all__ = ["DINODecoderLayer", "DINODecoder"]


class DINODecoderLayer(nn.Module):
    """
    Post-norm decoder layer: self-attention -> add & LN -> multi-scale deformable
    cross-attention -> add & LN -> FFN -> add & LN. The cross-attention is key-aware with
    ``key_aware`` (Lite DETR's decoder when its encoder is key-aware).
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
        key_aware: bool = False,
    ):
        """
        Args:
            embed_dim: C, query channels.
            num_heads: heads of both attentions.
            feedforward_dim: hidden width of the FFN.
            dropout: dropout after each sub-layer and inside the FFN.
            num_levels: feature levels of the memory.
            num_points: sampling points per head and level.
            key_aware: cross-attention weights from the query and the sampled keys
                (:class:`~focus_detr.layers.KeyAwareDeformableAttention`) instead of predicted
                from the query alone.
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
        attention_cls = KeyAwareDeformableAttention if key_aware else MultiScaleDeformableAttention
        self.cross_attn = attention_cls(
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
        return_sampling: bool = False,
        *,
        level_shapes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
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
            return_sampling: also return the cross-attention's sampling locations and weights.
            level_shapes: the contents of ``spatial_shapes`` as Python ints
                (``FlattenedFeatures.level_shapes``): the tensors are then not read back.

        Returns:
            (B, Q, C) updated queries; with ``return_sampling`` a tuple ``(queries, locations
            (B, Q, H, L, P, 2), weights (B, Q, H, L, P))``.
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
            return_sampling=return_sampling,
            level_shapes=level_shapes,
        )
        sampling = None
        if return_sampling:
            attended, *sampling = attended
        queries = self.norm2(queries + self.dropout(attended))
        queries = self.norm3(queries + self.dropout(self.ffn(queries)))
        if return_sampling:
            return queries, sampling[0], sampling[1]
        return queries


class DINODecoder(nn.Module):
    """
    A stack of :class:`DINODecoderLayer` with per-layer class and box heads and iterative box
    refinement with "look forward twice", as the reference DINO: after layer i (output o_i) the
    next layer samples around ``r_{i+1} = sigmoid(box_head_i(o_i) + inverse_sigmoid(r_i))``,
    passed on detached; the box layer i *returns* is
    ``sigmoid(box_head_i(norm(o_i)) + inverse_sigmoid(r'_i))`` on the undetached previous box
    ``r'_i`` (the initial box for layer 0), so the loss of layer i also trains the box head of
    layer i - 1. Boxes are relative to each image's valid region and are multiplied by
    ``valid_ratios`` per level before sampling.
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
        prior_prob: float = 0.01,
        refine_from_normed: bool = False,
        inverse_sigmoid_eps: float = 1e-3,
        key_aware: bool = False,
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
            prior_prob: initial foreground probability of the class heads.
            refine_from_normed: False (reference): the next layer's reference box comes from the
                box head applied to the raw layer output o_i; True: to ``norm(o_i)`` like the
                returned predictions (then the box predicted and the box refined are the same).
            inverse_sigmoid_eps: clamp of the logit of reference boxes (reference: 1e-3).
            key_aware: key-aware cross-attention in every layer (Lite DETR's ``key_aware``
                reaches the decoder as well as the encoder).
        """
        super().__init__()
        if num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        if embed_dim <= 0 or embed_dim % 2 != 0:
            raise ValueError(f"embed_dim must be a positive even number, got {embed_dim}")
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if not 0.0 < inverse_sigmoid_eps < 0.5:
            raise ValueError(f"inverse_sigmoid_eps must be in (0, 0.5), got {inverse_sigmoid_eps}")
        self.num_layers = num_layers
        self.embed_dim = embed_dim
        self.num_levels = num_levels
        self.num_classes = num_classes
        self.refine_from_normed = refine_from_normed
        self.inverse_sigmoid_eps = inverse_sigmoid_eps
        layer = DINODecoderLayer(
            embed_dim=embed_dim,
            num_heads=num_heads,
            feedforward_dim=feedforward_dim,
            dropout=dropout,
            num_levels=num_levels,
            num_points=num_points,
            key_aware=key_aware,
        )
        self.layers = clone_modules(layer, num_layers)
        # sine embedding of (cx, cy, w, h): C/2 features each -> 2C
        self.ref_point_head = box_mlp(2 * embed_dim, embed_dim, embed_dim, num_layers=2)
        self.norm = nn.LayerNorm(embed_dim)
        class_head, box_head = detection_heads(embed_dim, num_classes, prior_prob)
        self.class_heads = clone_modules(class_head, num_layers)
        self.box_heads = clone_modules(box_head, num_layers)

    def forward(
        self,
        queries: torch.Tensor,
        reference_boxes: torch.Tensor,
        memory: torch.Tensor,
        features: FlattenedFeatures,
        self_attn_mask: Optional[torch.Tensor] = None,
        self_attn_key_padding_mask: Optional[torch.Tensor] = None,
        return_sampling: bool = False,
    ) -> DecoderOutput:
        """
        Args:
            queries: (B, Q, C) content queries (denoising queries first, if any).
            reference_boxes: (B, Q, 4) initial cxcywh boxes in sigmoid space (detached).
            memory: (B, N, C) encoder output.
            features: the flattened features (padding mask, level geometry, valid ratios).
            self_attn_mask: (Q, Q) bool, True = blocked, or None.
            self_attn_key_padding_mask: (B, Q) bool, True on queries nobody may attend to
                (padding slots of the denoising queries), or None.
            return_sampling: also return every layer's cross-attention sampling locations and
                attention weights.

        Returns:
            :class:`DecoderOutput` with ``class_logits`` (D, B, Q, K) and ``boxes`` (D, B, Q, 4)
            cxcywh in [0, 1].
        """
        eps = self.inverse_sigmoid_eps
        ratios = features.valid_ratios
        scale = torch.cat([ratios, ratios], dim=-1)[:, None, :, :]  # (B, 1, L, 4)
        reference = reference_boxes.detach()
        previous_box = reference  # the previous layer's box with gradient (layer 0: the input)
        all_logits, all_boxes, all_locations, all_weights = [], [], [], []
        for layer, class_head, box_head in zip(self.layers, self.class_heads, self.box_heads):
            level_boxes = reference[:, :, None, :] * scale.to(reference.dtype)
            query_pos = self.ref_point_head(
                get_sine_pos_embed(level_boxes[:, :, 0, :], self.embed_dim // 2).to(queries.dtype)
            )
            output = layer(
                queries,
                query_pos,
                level_boxes,
                memory,
                features.padding_mask,
                features.spatial_shapes,
                features.level_start_index,
                self_attn_mask,
                self_attn_key_padding_mask,
                return_sampling=return_sampling,
                level_shapes=features.level_shapes,
            )
            if return_sampling:
                output, locations, weights = output
                all_locations.append(locations)
                all_weights.append(weights)
            queries = output
            normed = self.norm(output)
            delta = box_head(normed)
            # the returned box is built on the previous layer's undetached box: its loss
            # reaches this layer's head and the previous one (not further, see previous_box)
            all_boxes.append((delta + inverse_sigmoid(previous_box, eps)).sigmoid())
            all_logits.append(class_head(normed))
            refine_delta = delta if self.refine_from_normed else box_head(output)
            # the next layer samples around this box; its gradient stops there, but the next
            # layer's returned box is built on it with gradient through this layer's head
            previous_box = (refine_delta + inverse_sigmoid(reference, eps)).sigmoid()
            reference = previous_box.detach()
        return DecoderOutput(
            class_logits=torch.stack(all_logits),
            boxes=torch.stack(all_boxes),
            sampling_locations=torch.stack(all_locations) if return_sampling else None,
            attention_weights=torch.stack(all_weights) if return_sampling else None,
        )
