"""Two-stage (mixed) query selection of DINO: the best encoder tokens become reference boxes."""

import math
from dataclasses import dataclass
from typing import Dict

import torch
from torch import nn

from .heads import detection_heads
from .structures import FlattenedFeatures

__all__ = ["TwoStageQuerySelection", "QuerySelection"]


@dataclass
class QuerySelection:
    """
    Output of :class:`TwoStageQuerySelection`.

    Attributes:
        queries: (B, Q, C) content queries (the learned embedding, the same for every image).
        reference_boxes: (B, Q, 4) detached cxcywh boxes in sigmoid space, decoder input.
        enc_logits: (B, Q, K) class logits of the selected tokens (``_enc`` loss).
        enc_boxes: (B, Q, 4) cxcywh boxes of the selected tokens, with gradient (``_enc`` loss).
        topk_indices: (B, Q) int64 indices of the selected tokens in the flattened memory.
        topk_valid: (B, Q) bool, False where a selected token has no valid proposal.
    """

    queries: torch.Tensor
    reference_boxes: torch.Tensor
    enc_logits: torch.Tensor
    enc_boxes: torch.Tensor
    topk_indices: torch.Tensor
    topk_valid: torch.Tensor


class TwoStageQuerySelection(nn.Module):
    """
    Scores every encoder token with a class head, refines its proposal with a box head and keeps
    the top-Q tokens (by max class logit) as decoder reference boxes; the content queries stay
    learned ("mixed query selection"). Its ``memory_projection``, ``class_head`` and ``box_head``
    are the heads encoders may share (see :meth:`shared_heads`).
    """

    def __init__(
        self,
        *,
        hidden_dim: int = 256,
        num_classes: int = 80,
        num_queries: int = 900,
        base_scale: float = 0.05,
        prior_prob: float = 0.01,
        select_invalid_tokens: bool = True,
        select_padded_tokens: bool = True,
    ):
        """
        Args:
            hidden_dim: C, channels of the memory and the queries.
            num_classes: K, object classes.
            num_queries: Q, decoder queries (clamped to the token count at run time).
            base_scale: side of the level-0 proposals; doubles per level (the meta-architecture
                builds the proposals with it).
            prior_prob: initial foreground probability of the class head.
            select_invalid_tokens: True (reference): the top-Q runs over every token; a token
                without a valid proposal (the outer ring of fine levels) has its memory zeroed
                and a +inf proposal, so if picked its box is (1, 1, 1, 1). False: such tokens
                (padded ones included) are ranked last and picked only when an image has fewer
                than Q valid tokens, then with a centred proposal.
            select_padded_tokens: with ``select_invalid_tokens``, whether padded tokens compete
                too. True (reference): they are invalid tokens like the others (zeroed memory,
                box (1, 1, 1, 1)); an image can then pick them only in a padded batch. False:
                they are ranked last, so an image picks the same tokens alone or in any batch.
        """
        super().__init__()
        for name, value in (
            ("hidden_dim", hidden_dim),
            ("num_classes", num_classes),
            ("num_queries", num_queries),
            ("base_scale", base_scale),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.num_queries = num_queries
        self.base_scale = base_scale
        self.select_invalid_tokens = select_invalid_tokens
        self.select_padded_tokens = select_padded_tokens
        self.memory_projection = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim)
        )
        self.class_head, self.box_head = detection_heads(hidden_dim, num_classes, prior_prob)
        self.content_queries = nn.Embedding(num_queries, hidden_dim)

    def shared_heads(self) -> Dict[str, nn.Module]:
        """The modules an encoder may use (see ``DETREncoder.shared_heads``)."""
        return {
            "memory_projection": self.memory_projection,
            "class_head": self.class_head,
            "box_head": self.box_head,
        }

    def forward(self, memory: torch.Tensor, features: FlattenedFeatures) -> QuerySelection:
        """
        Args:
            memory: (B, N, C) encoder output.
            features: the flattened features (proposals, their validity).

        Returns:
            :class:`QuerySelection` with Q = min(num_queries, N).
        """
        valid = features.proposal_valid
        # invalid tokens must not leak their features into the heads
        memory = memory.masked_fill(~valid[..., None], 0.0)
        projected = self.memory_projection(memory)
        logits = self.class_head(projected)
        num_queries = min(self.num_queries, memory.shape[1])
        scores = logits.max(-1).values
        # the reference ranks the invalid tokens (the outer ring of fine levels, padding) like
        # any token; the options rank padding, or every invalid token, last
        if not self.select_invalid_tokens:
            scores = scores.masked_fill(~valid, -math.inf)
        elif not self.select_padded_tokens:
            scores = scores.masked_fill(features.padding_mask, -math.inf)
        topk_indices = scores.topk(num_queries, dim=1).indices
        topk_valid = valid.gather(1, topk_indices)

        selected_logits = logits.gather(1, topk_indices[..., None].expand(-1, -1, logits.shape[-1]))
        selected_features = projected.gather(
            1, topk_indices[..., None].expand(-1, -1, projected.shape[-1])
        )
        selected_proposals = features.proposals.gather(1, topk_indices[..., None].expand(-1, -1, 4))
        if not self.select_invalid_tokens:
            # only an image with fewer usable tokens than Q picks invalid ones: give them a
            # finite centred proposal instead of +inf so that no box becomes degenerate
            selected_proposals = selected_proposals.masked_fill(~topk_valid[..., None], 0.0)
        enc_boxes = (self.box_head(selected_features) + selected_proposals).sigmoid()

        queries = self.content_queries.weight[:num_queries]
        queries = queries[None].expand(memory.shape[0], -1, -1)
        return QuerySelection(
            queries=queries,
            reference_boxes=enc_boxes.detach(),
            enc_logits=selected_logits,
            enc_boxes=enc_boxes,
            topk_indices=topk_indices,
            topk_valid=topk_valid,
        )
