"""The structures that travel between the parts of a two-stage DETR.

Batch first everywhere: ``B`` images, ``N`` flattened multi-scale tokens, ``L`` levels, ``C``
channels, ``Q`` decoder queries, ``D`` decoder layers, ``K`` classes, ``H`` attention heads,
``P`` sampling points.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["FlattenedFeatures", "EncoderOutput", "DecoderOutput", "int64_tensor"]


def int64_tensor(values: Sequence, device: torch.device) -> torch.Tensor:
    """
    Python ints as an int64 tensor on ``device``. The copy to an accelerator is issued without
    waiting for it (``non_blocking``; the values are staged before the call returns), so that
    building geometry from Python sizes never stalls the stream.
    """
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)


@dataclass
class FlattenedFeatures:
    """
    Multi-scale feature maps flattened level after level (row-major inside a level), with the
    geometry every encoder, the query selection and the decoder need. Level shapes and valid
    token counts are carried as Python ints so that no module reads a tensor back to learn them.
    The geometry is checked here, once, when the features are made: ``spatial_shapes`` and
    ``level_start_index`` are built from ``level_shapes``, so the deformable attention calls
    that receive them with ``level_shapes`` need not read them back to check them.

    Attributes:
        tokens: (B, N, C) neck features.
        pos: (B, N, C) sine position embedding plus the learned level embedding, or None when
            the encoder declares that it does not use it (``uses_position_embedding``).
        padding_mask: (B, N) bool, True on tokens outside the image (batch padding).
        level_shapes: L pairs ``(h_l, w_l)`` of Python ints, finest level first.
        strides: L nominal strides (input pixels per cell), e.g. (8, 16, 32, 64).
        spatial_shapes: (L, 2) int64 tensor of ``level_shapes`` (the deformable attention op's
            argument), on the tokens' device; made from ``level_shapes`` (not an argument).
        level_start_index: (L,) int64 tensor, offset of every level in the N tokens; made from
            ``level_shapes`` (not an argument).
        valid_ratios: (B, L, 2) ``(valid_w / w_l, valid_h / h_l)`` of every image and level.
        proposals: (B, N, 4) one square cxcywh proposal per token in logit space (DINO's
            two-stage proposals); ``+inf`` where ``proposal_valid`` is False.
        proposal_valid: (B, N) bool, False on padding and on tokens whose proposal leaves
            (0.01, 0.99) (the outer ring of the fine levels).
        padded_size: ``(H, W)`` of the padded input batch in pixels.
        valid_token_counts: B Python ints, the unpadded tokens of every image (the False
            entries of its row of ``padding_mask``), known from the image sizes.
    """

    tokens: torch.Tensor
    pos: Optional[torch.Tensor]
    padding_mask: torch.Tensor
    level_shapes: Tuple[Tuple[int, int], ...]
    strides: Tuple[int, ...]
    valid_ratios: torch.Tensor
    proposals: torch.Tensor
    proposal_valid: torch.Tensor
    padded_size: Tuple[int, int]
    valid_token_counts: Tuple[int, ...]
    spatial_shapes: torch.Tensor = field(init=False)
    level_start_index: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        """ValueError naming the values when the geometry is inconsistent (no tensor read)."""
        self.level_shapes = tuple((int(h), int(w)) for h, w in self.level_shapes)
        self.strides = tuple(int(stride) for stride in self.strides)
        self.valid_token_counts = tuple(int(count) for count in self.valid_token_counts)
        if not self.level_shapes or any(h <= 0 or w <= 0 for h, w in self.level_shapes):
            raise ValueError(f"level_shapes must be positive (h, w) pairs, got {self.level_shapes}")
        if len(self.strides) != len(self.level_shapes):
            raise ValueError(
                f"need one stride per level: strides {self.strides}, level shapes "
                f"{self.level_shapes}"
            )
        if self.tokens.dim() != 3:
            raise ValueError(f"tokens must be (B, N, C), got shape {tuple(self.tokens.shape)}")
        batch, num_tokens = self.tokens.shape[:2]
        if sum(self.level_sizes) != num_tokens:
            raise ValueError(
                f"level shapes {self.level_shapes} hold {sum(self.level_sizes)} tokens but "
                f"tokens has N = {num_tokens} (shape {tuple(self.tokens.shape)})"
            )
        counts = self.valid_token_counts
        if len(counts) != batch or any(not 0 <= count <= num_tokens for count in counts):
            raise ValueError(
                f"valid_token_counts must be {batch} counts in [0, {num_tokens}], got {counts}"
            )
        device = self.tokens.device
        self.spatial_shapes = int64_tensor(self.level_shapes, device).view(-1, 2)
        self.level_start_index = int64_tensor(self.level_starts, device)

    @property
    def num_levels(self) -> int:
        return len(self.level_shapes)

    @property
    def level_sizes(self) -> List[int]:
        """Tokens per level, ``h_l * w_l``."""
        return [height * width for height, width in self.level_shapes]

    @property
    def level_starts(self) -> List[int]:
        """Offset of every level in the N tokens, as Python ints."""
        starts, total = [], 0
        for size in self.level_sizes:
            starts.append(total)
            total += size
        return starts

    def split_levels(self, values: torch.Tensor) -> Sequence[torch.Tensor]:
        """Split a (B, N, ...) tensor into L tensors (B, h_l * w_l, ...)."""
        return values.split(self.level_sizes, dim=1)


@dataclass
class EncoderOutput:
    """
    What every encoder returns to the meta-architecture.

    Attributes:
        memory: (B, N, C) encoded tokens; tokens an encoder never updated keep their input value.
        layer_indices: one entry per encoder layer: a (B, k_l) int64 tensor of the token indices
            the layer updated (best first for encoders that rank tokens), or None when the layer
            updated every valid token.
        layer_valid: one entry per layer: a (B, k_l) bool tensor, True where the layer really
            wrote the token back (inside the image's budget, never a padded token), or None with
            ``layer_indices`` None.
        token_scores: (B, N) logits of the encoder's token selector (Focus: foreground logits;
            Sparse DETR: saliency logits), with gradient for the encoder's own loss; padded
            tokens hold a finite value no larger than any valid one. None for encoders that do
            not score tokens.
        extras: encoder-specific tensors its :meth:`losses` needs (never read by the
            meta-architecture).
    """

    memory: torch.Tensor
    layer_indices: List[Optional[torch.Tensor]] = field(default_factory=list)
    layer_valid: List[Optional[torch.Tensor]] = field(default_factory=list)
    token_scores: Optional[torch.Tensor] = None
    extras: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layer_indices)

    def tokens_updated(self, padding_mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            padding_mask: (B, N) bool, True on padded tokens.

        Returns:
            (num_layers, B) int64: how many tokens of every image each layer updated.
        """
        counts = []
        num_valid = (~padding_mask).sum(dim=1)
        for indices, valid in zip(self.layer_indices, self.layer_valid):
            if indices is None:
                counts.append(num_valid)
            elif valid is None:
                counts.append((~padding_mask.gather(1, indices)).sum(dim=1))
            else:
                counts.append(valid.sum(dim=1))
        if not counts:
            return num_valid.new_zeros(0, padding_mask.shape[0])
        return torch.stack(counts)

    def updated_mask(self, layer: int, padding_mask: torch.Tensor) -> torch.Tensor:
        """(B, N) bool: the tokens layer ``layer`` updated."""
        indices, valid = self.layer_indices[layer], self.layer_valid[layer]
        if indices is None:
            return ~padding_mask
        if valid is None:
            valid = ~padding_mask.gather(1, indices)
        mask = torch.zeros_like(padding_mask)
        return mask.scatter(1, indices, valid)


@dataclass
class DecoderOutput:
    """
    Predictions of every decoder layer, and optionally where it looked.

    Attributes:
        class_logits: (D, B, T, K) class logits of the T queries (denoising queries first).
        boxes: (D, B, T, 4) cxcywh boxes in [0, 1], relative to each image's own size.
        sampling_locations: (D, B, T, H, L, P, 2) normalized (x, y) sampling locations of the
            cross-attention on the padded feature grids, or None unless requested.
        attention_weights: (D, B, T, H, L, P) their attention weights, or None.
    """

    class_logits: torch.Tensor
    boxes: torch.Tensor
    sampling_locations: Optional[torch.Tensor] = None
    attention_weights: Optional[torch.Tensor] = None
