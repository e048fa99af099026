"""From flattened encoder outputs to per-level 2-D maps, cropped to the image's valid cells."""

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from focus_detr.modeling.multi_scale import level_padding_masks

__all__ = ["LevelGrid", "level_grids", "split_levels", "foreground_maps", "kept_token_maps"]


@dataclass(frozen=True)
class LevelGrid:
    """
    Where one feature level sits in the flattened tokens and on the network input.

    Attributes:
        start: index of the level's first token in the flattened (N,) token sequence.
        height, width: (h_l, w_l) of the level's padded grid; the level holds h_l * w_l tokens.
        valid_height, valid_width: the cells holding image content (the rest is padding).
        stride_y, stride_x: input pixels per cell: (padded input size) / (h_l, w_l).
    """

    start: int
    height: int
    width: int
    valid_height: int
    valid_width: int
    stride_y: float
    stride_x: float

    @property
    def num_tokens(self) -> int:
        return self.height * self.width

    @property
    def num_valid(self) -> int:
        return self.valid_height * self.valid_width


def level_grids(
    spatial_shapes: torch.Tensor,
    *,
    image_size: Tuple[int, int],
    padded_size: Tuple[int, int],
) -> List[LevelGrid]:
    """
    The layout of every level for one image of a padded batch.

    Args:
        spatial_shapes: (L, 2) int64 (h_l, w_l) of every level, finest first; the levels are
            flattened one after the other, row-major inside a level.
        image_size: (h, w) of the image given to the network (after resizing, before padding).
        padded_size: (H, W) of the padded batch tensor.

    Returns:
        One :class:`LevelGrid` per level. A cell is valid exactly when the model treats it as
        valid (``level_padding_masks``): cell j is valid iff ``j < ceil(w * w_l / W)``.
    """
    shapes = [tuple(int(v) for v in shape) for shape in torch.as_tensor(spatial_shapes).tolist()]
    if len(shapes) == 0 or any(len(shape) != 2 or min(shape) <= 0 for shape in shapes):
        raise ValueError(f"spatial_shapes must be (L, 2) positive sizes, got {shapes}")
    height, width = image_size
    pad_h, pad_w = padded_size
    if not (0 < height <= pad_h and 0 < width <= pad_w):
        raise ValueError(f"image_size {tuple(image_size)} must fit in padded_size {padded_size}")
    masks = level_padding_masks([image_size], (pad_h, pad_w), shapes, torch.device("cpu"))
    grids = []
    start = 0
    for (level_h, level_w), mask in zip(shapes, masks):
        valid = ~mask[0]
        grids.append(
            LevelGrid(
                start=start,
                height=level_h,
                width=level_w,
                valid_height=int(valid[:, 0].sum()),
                valid_width=int(valid[0, :].sum()),
                stride_y=pad_h / level_h,
                stride_x=pad_w / level_w,
            )
        )
        start += level_h * level_w
    return grids


def _num_tokens(grids: Sequence[LevelGrid]) -> int:
    return grids[-1].start + grids[-1].num_tokens


def split_levels(values: torch.Tensor, grids: Sequence[LevelGrid]) -> List[torch.Tensor]:
    """
    Args:
        values: (N,) one value per flattened token of one image.
        grids: the layout from :func:`level_grids`.

    Returns:
        One (valid_height, valid_width) tensor per level: the level's padded (h_l, w_l) grid with
        the padding rows and columns cropped.
    """
    num_tokens = _num_tokens(grids)
    if values.dim() != 1 or values.shape[0] != num_tokens:
        raise ValueError(
            f"expected ({num_tokens},) values for levels "
            f"{[(g.height, g.width) for g in grids]}, got shape {tuple(values.shape)}"
        )
    return [
        values[grid.start : grid.start + grid.num_tokens].view(grid.height, grid.width)[
            : grid.valid_height, : grid.valid_width
        ]
        for grid in grids
    ]


def foreground_maps(
    foreground_logits: torch.Tensor, grids: Sequence[LevelGrid]
) -> List[torch.Tensor]:
    """
    Args:
        foreground_logits: (N,) foreground logits of one image's tokens.
        grids: the layout from :func:`level_grids`.

    Returns:
        One (valid_height, valid_width) float tensor of foreground probabilities (sigmoid of the
        logits) per level, on the CPU.
    """
    return split_levels(foreground_logits.detach().float().sigmoid().cpu(), grids)


def kept_token_maps(
    indices: torch.Tensor, valid: torch.Tensor, grids: Sequence[LevelGrid]
) -> List[torch.Tensor]:
    """
    The tokens one encoder layer kept (gathered and wrote back), as per-level masks.

    Args:
        indices: (k,) int64 flattened token indices the layer gathered.
        valid: (k,) bool, True where the layer wrote the token back (inside the image's budget).
        grids: the layout from :func:`level_grids`.

    Returns:
        One (valid_height, valid_width) bool tensor per level, True on kept tokens.
    """
    num_tokens = _num_tokens(grids)
    if indices.dim() != 1 or valid.shape != indices.shape:
        raise ValueError(
            f"indices and valid must both be (k,), got {tuple(indices.shape)} and "
            f"{tuple(valid.shape)}"
        )
    indices = indices.detach().long().cpu()
    if indices.numel() > 0 and not (0 <= int(indices.min()) and int(indices.max()) < num_tokens):
        raise ValueError(
            f"token indices must be in [0, {num_tokens}), got range "
            f"[{int(indices.min())}, {int(indices.max())}]"
        )
    kept = torch.zeros(num_tokens, dtype=torch.bool)
    kept[indices[valid.detach().bool().cpu()]] = True
    return split_levels(kept, grids)
