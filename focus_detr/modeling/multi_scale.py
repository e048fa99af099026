"""Padding masks, flattening, valid ratios, proposals and reference points of multi-scale maps."""

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .structures import FlattenedFeatures, int64_tensor

__all__ = [
    "encoder_reference_points",
    "flatten_levels",
    "generate_proposals",
    "image_sizes_tensor",
    "level_padding_masks",
    "valid_ratios",
    "valid_token_counts",
]

ImageSizes = Union[Sequence[Tuple[int, int]], Sequence[torch.Tensor]]


def image_sizes_tensor(image_sizes: ImageSizes, device: torch.device) -> torch.Tensor:
    """
    ``ImageList.image_sizes`` as a (B, 2) int64 tensor of (h, w). It holds Python ints in eager
    mode (copied to ``device`` without waiting for it) and (2,) tensors while ``torch.jit.trace``
    runs (detectron2's FLOP counter), which are stacked rather than read back.
    """
    if any(isinstance(size, torch.Tensor) for size in image_sizes):
        sizes = [torch.as_tensor(size, dtype=torch.int64, device=device) for size in image_sizes]
        return torch.stack(sizes).view(-1, 2)
    return int64_tensor([(size[0], size[1]) for size in image_sizes], device).view(-1, 2)


def _valid_cells(size: int, cells: int, padded: int) -> int:
    """Valid cells of a level axis of ``cells`` cells for an image ``size`` of ``padded``."""
    # the float64 arithmetic of level_padding_masks, on Python numbers: int / int is the same
    # correctly rounded quotient
    return min(max(math.ceil(size * cells / padded), 1), cells)


def valid_token_counts(
    image_sizes: ImageSizes,
    padded_size: Tuple[int, int],
    level_shapes: Sequence[Tuple[int, int]],
) -> Tuple[int, ...]:
    """
    Per image, the tokens of all levels that :func:`level_padding_masks` marks valid, computed
    in Python from the image sizes (no tensor is read; under ``torch.jit.trace`` the (2,) size
    tensors become constants of the trace).

    Returns:
        B Python ints.
    """
    pad_h, pad_w = padded_size
    counts = []
    for size in image_sizes:
        height, width = int(size[0]), int(size[1])
        counts.append(
            sum(
                _valid_cells(height, level_h, pad_h) * _valid_cells(width, level_w, pad_w)
                for level_h, level_w in level_shapes
            )
        )
    return tuple(counts)


def level_padding_masks(
    image_sizes: ImageSizes,
    padded_size: Tuple[int, int],
    level_shapes: Sequence[Tuple[int, int]],
    device: torch.device,
) -> List[torch.Tensor]:
    """
    Padding masks of every level, from the image sizes (used in training AND inference).

    Args:
        image_sizes: (h, w) of every image before padding.
        padded_size: (H, W) of the padded batch tensor.
        level_shapes: (h_l, w_l) of every level.
        device: where the masks are built.

    Returns:
        One (B, h_l, w_l) bool tensor per level, True on padding. A feature cell is valid when
        its receptive area starts inside the image: cell j is valid iff j < ceil(w * w_l / W),
        at least one cell per image and axis.
    """
    pad_h, pad_w = padded_size
    sizes = image_sizes_tensor(image_sizes, device).to(torch.float64)
    masks = []
    for height, width in level_shapes:
        valid_h = torch.ceil(sizes[:, 0] * height / pad_h).clamp(min=1)
        valid_w = torch.ceil(sizes[:, 1] * width / pad_w).clamp(min=1)
        rows = torch.arange(height, device=device, dtype=torch.float64)
        cols = torch.arange(width, device=device, dtype=torch.float64)
        masks.append(
            (rows[None, :, None] >= valid_h[:, None, None])
            | (cols[None, None, :] >= valid_w[:, None, None])
        )
    return masks


def valid_ratios(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, h, w) padding mask -> (B, 2) ``(valid_w / w, valid_h / h)`` in ``dtype``."""
    _, height, width = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).to(dtype)
    valid_w = (~mask[:, 0, :]).sum(1).to(dtype)
    return torch.stack([valid_w / width, valid_h / height], dim=-1)


def generate_proposals(
    masks: Sequence[torch.Tensor],
    dtype: torch.dtype,
    *,
    base_scale: float = 0.05,
    valid_range: Tuple[float, float] = (0.01, 0.99),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    One square proposal per token (DINO's two-stage proposals): the cell centre relative to the
    image's valid (unpadded) extent of the level, with side ``base_scale * 2 ** level``.

    Args:
        masks: L padding masks (B, h_l, w_l), True on padding.
        dtype: floating dtype of the result.
        base_scale: side of the level-0 proposals (normalized units).
        valid_range: a proposal is usable only if all four numbers lie strictly inside it.

    Returns:
        ``(proposals (B, N, 4) cxcywh in logit space with +inf where invalid,
        valid (B, N) bool)``.
    """
    proposals = []
    for level, mask in enumerate(masks):
        batch, height, width = mask.shape
        ys = torch.arange(height, dtype=dtype, device=mask.device) + 0.5
        xs = torch.arange(width, dtype=dtype, device=mask.device) + 0.5
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack([grid_x, grid_y], dim=-1).expand(batch, height, width, 2)
        # valid extent = valid cells of the first row / column (padding is bottom-right)
        valid_w = (~mask[:, 0, :]).sum(1).clamp(min=1)
        valid_h = (~mask[:, :, 0]).sum(1).clamp(min=1)
        size = torch.stack([valid_w, valid_h], dim=-1).to(dtype)
        centres = centres / size[:, None, None, :]
        wh = torch.full_like(centres, base_scale * 2.0**level)
        proposals.append(torch.cat([centres, wh], dim=-1).flatten(1, 2))
    proposals = torch.cat(proposals, dim=1)
    padding_mask = torch.cat([mask.flatten(1) for mask in masks], dim=1)
    low, high = valid_range
    valid = ((proposals > low) & (proposals < high)).all(-1) & ~padding_mask
    # in (0.01, 0.99) where valid: the logit needs no clamping there
    proposals = torch.logit(proposals.clamp(min=low, max=high))
    proposals = proposals.masked_fill(~valid[..., None], float("inf"))
    return proposals, valid


def flatten_levels(
    features: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    positions: Optional[Sequence[torch.Tensor]],
    level_embed: Optional[torch.Tensor],
    *,
    strides: Sequence[int],
    padded_size: Tuple[int, int],
    image_sizes: ImageSizes,
    proposal_base_scale: float = 0.05,
) -> FlattenedFeatures:
    """
    Args:
        features: L tensors (B, C, h_l, w_l), finest first.
        masks: L bool tensors (B, h_l, w_l), True on padding: ``level_padding_masks`` of
            ``image_sizes``.
        positions: L position embeddings (B, C, h_l, w_l), or None for an encoder that uses
            none (then ``level_embed`` is None too, and ``pos`` is None).
        level_embed: (L, C) learned level embedding, or None.
        strides: L nominal strides of the levels.
        padded_size: (H, W) of the padded input batch.
        image_sizes: (h, w) of every image before padding (``ImageList.image_sizes``).
        proposal_base_scale: side of the level-0 two-stage proposals.

    Returns:
        :class:`FlattenedFeatures`.
    """
    if (positions is None) != (level_embed is None):
        raise ValueError(
            "positions and level_embed must both be given or both be None, got "
            f"{'None' if positions is None else len(positions)} positions and "
            f"{'None' if level_embed is None else tuple(level_embed.shape)} level embeddings"
        )
    num_positions = len(features) if positions is None else len(positions)
    num_embeddings = len(features) if level_embed is None else level_embed.shape[0]
    if not len(features) == len(masks) == num_positions == num_embeddings == len(strides):
        raise ValueError(
            f"need one mask, position embedding, level embedding and stride per level: got "
            f"{len(features)} levels, {len(masks)} masks, {num_positions} positions, "
            f"{num_embeddings} level embeddings, strides {list(strides)}"
        )
    if len(image_sizes) != features[0].shape[0]:
        raise ValueError(
            f"need one image size per image: {len(image_sizes)} sizes for a batch of "
            f"{features[0].shape[0]}"
        )
    for level, (feature, mask) in enumerate(zip(features, masks)):
        batch, _, height, width = feature.shape
        position_shape = feature.shape if positions is None else positions[level].shape
        if mask.shape != (batch, height, width) or position_shape != feature.shape:
            raise ValueError(
                f"level {level}: features {tuple(feature.shape)} need a mask "
                f"({batch}, {height}, {width}) and a position embedding of the same shape, got "
                f"{tuple(mask.shape)} and {tuple(position_shape)}"
            )
    dtype = features[0].dtype
    # geometry (ratios, proposals) in at least float32, also under bfloat16 autocast
    geometry_dtype = torch.promote_types(dtype, torch.float32)
    level_shapes = tuple((int(f.shape[-2]), int(f.shape[-1])) for f in features)
    tokens = torch.cat([feature.flatten(2).transpose(1, 2) for feature in features], dim=1)
    pos = None
    if positions is not None:
        pos = torch.cat(
            [
                position.flatten(2).transpose(1, 2) + level_embed[level].view(1, 1, -1)
                for level, position in enumerate(positions)
            ],
            dim=1,
        ).to(dtype)
    proposals, proposal_valid = generate_proposals(
        masks, geometry_dtype, base_scale=proposal_base_scale
    )
    return FlattenedFeatures(
        tokens=tokens,
        pos=pos,
        padding_mask=torch.cat([mask.flatten(1) for mask in masks], dim=1),
        level_shapes=level_shapes,
        strides=tuple(strides),
        valid_ratios=torch.stack([valid_ratios(mask, geometry_dtype) for mask in masks], dim=1),
        proposals=proposals,
        proposal_valid=proposal_valid,
        padded_size=(int(padded_size[0]), int(padded_size[1])),
        valid_token_counts=valid_token_counts(image_sizes, padded_size, level_shapes),
    )


def encoder_reference_points(features: FlattenedFeatures) -> torch.Tensor:
    """
    Cell centres of every level normalized by the valid size, then expressed on every level
    (Deformable DETR's encoder reference points).

    Args:
        features: the flattened features (level shapes and valid ratios are used).

    Returns:
        (B, N, L, 2) normalized (x, y) reference points.
    """
    ratios = features.valid_ratios
    points = []
    for level, (height, width) in enumerate(features.level_shapes):
        ys, xs = torch.meshgrid(
            torch.arange(height, dtype=ratios.dtype, device=ratios.device) + 0.5,
            torch.arange(width, dtype=ratios.dtype, device=ratios.device) + 0.5,
            indexing="ij",
        )
        ys = ys.reshape(1, -1) / (ratios[:, None, level, 1] * height)
        xs = xs.reshape(1, -1) / (ratios[:, None, level, 0] * width)
        points.append(torch.stack((xs, ys), dim=-1))
    reference = torch.cat(points, dim=1)
    return reference[:, :, None] * ratios[:, None]
