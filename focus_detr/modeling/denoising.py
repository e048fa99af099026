"""Contrastive denoising (DINO): noised copies of the ground truth as extra decoder queries."""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchvision.ops import box_convert

__all__ = ["ContrastiveDenoising", "DenoisingQueries", "build_denoising_attn_mask"]


def build_denoising_attn_mask(
    num_groups: int, single_pad: int, num_queries: int, device: Optional[torch.device] = None
) -> torch.Tensor:
    """
    Self-attention mask of [denoising queries, matching queries].

    Args:
        num_groups: denoising groups.
        single_pad: queries per group.
        num_queries: matching queries, placed after the ``num_groups * single_pad`` DN queries.
        device: device of the mask.

    Returns:
        (T, T) bool, T = num_groups * single_pad + num_queries; True = the row may not attend to
        the column. Matching queries cannot see any DN query (they would read the answer); a DN
        group cannot see the other groups. DN queries may see the matching queries.
    """
    pad_size = num_groups * single_pad
    total = pad_size + num_queries
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[pad_size:, :pad_size] = True
    group = torch.arange(pad_size, device=device) // single_pad
    mask[:pad_size, :pad_size] = group[:, None] != group[None, :]
    return mask


@dataclass
class DenoisingQueries:
    """
    Denoising queries of a batch and what the loss needs to use them.

    Layout: ``num_groups`` groups of ``single_pad = 2 * max_gt`` slots; in group g, slot
    ``g * single_pad + j`` is the positive copy of ground truth j and
    ``g * single_pad + max_gt + j`` its negative copy. Images with fewer than ``max_gt`` boxes
    leave the remaining slots as padding.

    Attributes:
        queries: (B, pad_size, C) content (label embedding of the noised labels; 0 on padding).
        reference_boxes: (B, pad_size, 4) noised cxcywh boxes in sigmoid space.
        attn_mask: (pad_size + Q, pad_size + Q) bool, True = blocked.
        key_padding_mask: (B, pad_size + Q) bool, True on padding slots (so that real queries
            do not attend to them); optional input of the decoder's self-attention.
        slot_padding_mask: (B, pad_size) bool, True on padding slots (no loss there).
        positive_indices: B pairs ``(query_idx, tgt_idx)`` int64: the positive slots and the
            ground truth each one reconstructs (the matcher's output format).
        num_groups: number of groups.
        single_pad: slots per group (2 * max_gt).
        pad_size: num_groups * single_pad.
    """

    queries: torch.Tensor
    reference_boxes: torch.Tensor
    attn_mask: torch.Tensor
    key_padding_mask: torch.Tensor
    slot_padding_mask: torch.Tensor
    positive_indices: List[Tuple[torch.Tensor, torch.Tensor]]
    num_groups: int
    single_pad: int
    pad_size: int

    @property
    def max_gt(self) -> int:
        return self.single_pad // 2

    def split(self, tensor: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Split decoder outputs into the denoising part and the matching part.

        Args:
            tensor: (..., pad_size + Q, X), e.g. (D, B, T, K) logits or (D, B, T, 4) boxes.

        Returns:
            ``(dn_part (..., pad_size, X), matching_part (..., Q, X))``.
        """
        return tensor[..., : self.pad_size, :], tensor[..., self.pad_size :, :]

    def split_outputs(
        self, class_logits: torch.Tensor, boxes: torch.Tensor
    ) -> Tuple[Tuple[torch.Tensor, torch.Tensor], List[Dict[str, torch.Tensor]]]:
        """
        Split the decoder's stacked outputs for :class:`SetCriterion`.

        Args:
            class_logits: (D, B, pad_size + Q, K) decoder logits.
            boxes: (D, B, pad_size + Q, 4) decoder boxes.

        Returns:
            ``((class_logits (D, B, Q, K), boxes (D, B, Q, 4)), dn_outputs)`` where
            ``dn_outputs`` holds D dicts (first layer first) with "pred_logits"
            (B, pad_size, K) and "pred_boxes" (B, pad_size, 4).
        """
        dn_logits, class_logits = self.split(class_logits)
        dn_boxes, boxes = self.split(boxes)
        dn_outputs = [
            {"pred_logits": logits, "pred_boxes": layer_boxes}
            for logits, layer_boxes in zip(dn_logits, dn_boxes)
        ]
        return (class_logits, boxes), dn_outputs


class ContrastiveDenoising(nn.Module):
    """
    Builds the contrastive denoising queries of DINO: every group holds a positive copy
    (small box noise, to be reconstructed) and a negative copy (larger noise, to be called
    background) of every ground-truth box; labels are flipped at random in both.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        hidden_dim: int,
        dn_number: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
    ):
        """
        Args:
            num_classes: K object classes; the label embedding has K rows.
            hidden_dim: C, channels of the queries.
            dn_number: budget of denoising queries per polarity; groups = max(1, dn_number //
                max_gt). 0 disables denoising.
            label_noise_ratio: a label is replaced by a random class with probability
                label_noise_ratio / 2.
            box_noise_scale: scale of the corner shifts (1.0 = up to half the width/height for
                positives, up to the full width/height for negatives).
        """
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if hidden_dim <= 0:
            raise ValueError(f"hidden_dim must be positive, got {hidden_dim}")
        if dn_number < 0:
            raise ValueError(f"dn_number must be >= 0, got {dn_number}")
        if not 0.0 <= label_noise_ratio <= 1.0:
            raise ValueError(f"label_noise_ratio must be in [0, 1], got {label_noise_ratio}")
        if box_noise_scale < 0:
            raise ValueError(f"box_noise_scale must be >= 0, got {box_noise_scale}")
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.dn_number = dn_number
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.label_embedding = nn.Embedding(num_classes, hidden_dim)

    def num_groups(self, max_gt: int) -> int:
        """Groups for a batch whose largest image has ``max_gt`` boxes (max_gt >= 1)."""
        return max(1, self.dn_number // max_gt)

    def noise_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """(n,) int64 labels -> a copy where each label became a random class with p = ratio/2."""
        flip = torch.rand(labels.shape, device=labels.device) < self.label_noise_ratio * 0.5
        random_labels = torch.randint_like(labels, 0, self.num_classes)
        return torch.where(flip, random_labels, labels)

    def noise_boxes(self, boxes: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """
        Shift each corner coordinate by ``+-r * box_noise_scale * (w / 2 or h / 2)``.

        Args:
            boxes: (n, 4) normalized cxcywh boxes.
            negative: (n,) bool; r is drawn in [0, 1) for positives and [1, 2) for negatives.

        Returns:
            (n, 4) noised cxcywh boxes, corners clamped to [0, 1].
        """
        corners = box_convert(boxes, "cxcywh", "xyxy")
        half_wh = boxes[:, 2:].repeat(1, 2) * 0.5
        magnitude = torch.rand_like(corners) + negative[:, None].to(corners.dtype)
        sign = torch.randint_like(corners, 0, 2) * 2.0 - 1.0
        corners = corners + sign * magnitude * half_wh * self.box_noise_scale
        corners = corners.clamp(min=0.0, max=1.0)
        # negative shifts may cross the two corners: keep widths non-negative
        wh = (corners[:, 2:] - corners[:, :2]).clamp(min=0.0)
        return torch.cat([(corners[:, :2] + corners[:, 2:]) * 0.5, wh], dim=-1)

    def forward(
        self, targets: List[Dict[str, torch.Tensor]], num_queries: int
    ) -> Optional[DenoisingQueries]:
        """
        Args:
            targets: B dicts with "labels" (M_i,) int64 and "boxes" (M_i, 4) normalized cxcywh.
            num_queries: Q matching queries that follow the DN queries (for the mask).

        Returns:
            :class:`DenoisingQueries`, or None when ``dn_number == 0`` or the batch has no box.
        """
        if num_queries <= 0:
            raise ValueError(f"num_queries must be positive, got {num_queries}")
        counts = [int(t["labels"].numel()) for t in targets]
        max_gt = max(counts, default=0)
        if self.dn_number == 0 or max_gt == 0:
            return None
        device = self.label_embedding.weight.device
        # boxes in the model's dtype (float64 for a double model), at least float32
        box_dtype = torch.promote_types(self.label_embedding.weight.dtype, torch.float32)
        batch = len(targets)
        num_groups = self.num_groups(max_gt)
        single_pad = 2 * max_gt
        pad_size = num_groups * single_pad

        # all copies of all images in one flat list: (image, group, polarity, gt)
        image_ids, slots, labels, boxes, negative = [], [], [], [], []
        for image_id, (target, count) in enumerate(zip(targets, counts)):
            if count == 0:
                continue
            group = torch.arange(num_groups, device=device).view(-1, 1, 1)
            polarity = torch.arange(2, device=device).view(1, -1, 1)
            gt = torch.arange(count, device=device).view(1, 1, -1)
            slot = (group * single_pad + polarity * max_gt + gt).flatten()
            slots.append(slot)
            image_ids.append(torch.full_like(slot, image_id))
            negative.append((polarity == 1).expand(num_groups, 2, count).flatten())
            repeats = 2 * num_groups
            labels.append(target["labels"].to(device).repeat(repeats))
            boxes.append(target["boxes"].to(device=device, dtype=box_dtype).repeat(repeats, 1))
        image_ids = torch.cat(image_ids)
        slots = torch.cat(slots)
        negative = torch.cat(negative)
        labels = self.noise_labels(torch.cat(labels))
        boxes = self.noise_boxes(torch.cat(boxes), negative)

        weight = self.label_embedding.weight
        queries = weight.new_zeros(batch, pad_size, self.hidden_dim)
        queries[image_ids, slots] = self.label_embedding(labels)
        # padding slots get a harmless centred box; they are masked out of attention and loss
        reference_boxes = boxes.new_full((batch, pad_size, 4), 0.5)
        reference_boxes[image_ids, slots] = boxes
        slot_padding_mask = torch.ones(batch, pad_size, dtype=torch.bool, device=device)
        slot_padding_mask[image_ids, slots] = False
        key_padding_mask = torch.cat(
            [slot_padding_mask, slot_padding_mask.new_zeros(batch, num_queries)], dim=1
        )

        positive_indices = []
        for count in counts:
            gt = torch.arange(count, device=device)
            offsets = torch.arange(num_groups, device=device)[:, None] * single_pad
            positive_indices.append(((offsets + gt).flatten(), gt.repeat(num_groups)))

        return DenoisingQueries(
            queries=queries,
            reference_boxes=reference_boxes,
            attn_mask=build_denoising_attn_mask(num_groups, single_pad, num_queries, device),
            key_padding_mask=key_padding_mask,
            slot_padding_mask=slot_padding_mask,
            positive_indices=positive_indices,
            num_groups=num_groups,
            single_pad=single_pad,
            pad_size=pad_size,
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, dn_number={self.dn_number}, "
            f"label_noise_ratio={self.label_noise_ratio}, box_noise_scale={self.box_noise_scale}"
        )
