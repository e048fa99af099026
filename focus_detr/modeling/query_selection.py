"""Two-stage (mixed) query selection of DINO: the best encoder tokens become reference boxes."""

import math
from dataclasses import dataclass

import torch
from torch import nn

from .utils import check_box_frame, detection_heads

__all__ = ["TwoStageQuerySelection", "QuerySelection", "generate_proposals"]


def generate_proposals(
    padding_mask: torch.Tensor,
    spatial_shapes: torch.Tensor,
    *,
    base_scale: float = 0.05,
    frame: str = "valid",
    valid_range: tuple = (0.01, 0.99),
):
    """
    One square proposal per token: the cell centre with side ``base_scale * 2 ** level``.

    Args:
        padding_mask: (B, N) bool, True on padding tokens.
        spatial_shapes: (L, 2) int64 (h, w) of every level.
        base_scale: side of the level-0 proposals (normalized units).
        frame: "valid" (the package's convention): relative to each image's valid (unpadded)
            region, as in Deformable DETR and DINO; "padded": relative to the padded feature map.
        valid_range: a proposal is usable only if all four numbers lie strictly inside it.

    Returns:
        ``(proposals (B, N, 4) cxcywh in inverse-sigmoid space, +inf where invalid,
        valid (B, N) bool)``.
    """
    check_box_frame(frame)
    batch = padding_mask.shape[0]
    device = padding_mask.device
    proposals, start = [], 0
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        level_valid = ~padding_mask[:, start : start + height * width].view(batch, height, width)
        start += height * width
        ys = torch.arange(height, dtype=torch.float32, device=device) + 0.5
        xs = torch.arange(width, dtype=torch.float32, device=device) + 0.5
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack([grid_x, grid_y], dim=-1).expand(batch, height, width, 2)
        if frame == "valid":
            # valid extent = valid cells of the first row / column (padding is bottom-right)
            valid_w = level_valid[:, 0, :].sum(1).clamp(min=1)
            valid_h = level_valid[:, :, 0].sum(1).clamp(min=1)
            size = torch.stack([valid_w, valid_h], dim=-1).to(torch.float32)
        else:
            size = torch.tensor([width, height], dtype=torch.float32, device=device).expand(
                batch, 2
            )
        centres = centres / size[:, None, None, :]
        wh = torch.full_like(centres, base_scale * 2.0**level)
        proposals.append(torch.cat([centres, wh], dim=-1).flatten(1, 2))
    proposals = torch.cat(proposals, dim=1)
    low, high = valid_range
    valid = ((proposals > low) & (proposals < high)).all(-1) & ~padding_mask
    proposals = torch.log(proposals / (1 - proposals).clamp(min=1e-6))
    proposals = proposals.masked_fill(~valid[..., None], math.inf)
    return proposals, valid


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
        topk_valid: (B, Q) bool, False where an image had fewer than Q usable tokens.
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
    learned ("mixed query selection"). ``memory_projection`` and ``class_head`` are shared with
    the encoder's token selector and multi-category score predictor.
    """

    def __init__(
        self,
        *,
        hidden_dim: int = 256,
        num_classes: int = 80,
        num_queries: int = 900,
        base_scale: float = 0.05,
        frame: str = "valid",
        prior_prob: float = 0.01,
    ):
        """
        Args:
            hidden_dim: C, channels of the memory and the queries.
            num_classes: K, object classes.
            num_queries: Q, decoder queries (clamped to the token count at run time).
            base_scale: side of the level-0 proposals; doubles per level.
            frame: coordinate frame of the boxes, "valid" or "padded" (see
                :func:`generate_proposals`); must match the decoder's and the targets'.
            prior_prob: initial foreground probability of the class head.
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
        check_box_frame(frame)
        self.num_queries = num_queries
        self.base_scale = base_scale
        self.frame = frame
        self.memory_projection = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim)
        )
        self.class_head, self.box_head = detection_heads(hidden_dim, num_classes, prior_prob)
        self.content_queries = nn.Embedding(num_queries, hidden_dim)

    def forward(
        self, memory: torch.Tensor, padding_mask: torch.Tensor, spatial_shapes: torch.Tensor
    ) -> QuerySelection:
        """
        Args:
            memory: (B, N, C) encoder output.
            padding_mask: (B, N) bool, True on padding tokens.
            spatial_shapes: (L, 2) int64 (h, w) of every level.

        Returns:
            :class:`QuerySelection` with Q = min(num_queries, N).
        """
        proposals, valid = generate_proposals(
            padding_mask, spatial_shapes, base_scale=self.base_scale, frame=self.frame
        )
        # invalid tokens must not leak their features into the heads
        memory = memory.masked_fill(~valid[..., None], 0.0)
        projected = self.memory_projection(memory)
        logits = self.class_head(projected)
        num_queries = min(self.num_queries, memory.shape[1])
        scores = logits.max(-1).values.masked_fill(~valid, -math.inf)
        topk_indices = scores.topk(num_queries, dim=1).indices
        topk_valid = valid.gather(1, topk_indices)

        selected_logits = logits.gather(1, topk_indices[..., None].expand(-1, -1, logits.shape[-1]))
        selected_features = projected.gather(
            1, topk_indices[..., None].expand(-1, -1, projected.shape[-1])
        )
        selected_proposals = proposals.gather(1, topk_indices[..., None].expand(-1, -1, 4))
        # only an image with fewer usable tokens than Q picks invalid ones: give them a finite
        # centred proposal instead of +inf so that no box or gradient becomes inf or NaN
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
