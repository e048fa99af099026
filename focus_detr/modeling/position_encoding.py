"""Sine position embeddings for feature maps and for boxes."""

import math

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine", "get_sine_pos_embed"]


class PositionEmbeddingSine(nn.Module):
    """
    The DETR sine embedding of every pixel of a feature map: ``num_pos_feats`` features for y then
    ``num_pos_feats`` for x, computed from the cumulative count of valid pixels so that padding does
    not shift the embedding of the image.
    """

    def __init__(
        self,
        *,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        offset: float = -0.5,
        eps: float = 1e-6,
    ):
        """
        Args:
            num_pos_feats: features per axis (the embedding has ``2 * num_pos_feats`` channels).
            temperature: base of the frequency ladder.
            normalize: normalize coordinates by the valid extent, then multiply by ``scale``.
            scale: range of normalized coordinates.
            offset: added to the cumulative coordinate before normalizing (-0.5: pixel centres).
            eps: keeps the normalization finite.
        """
        super().__init__()
        if num_pos_feats <= 0 or num_pos_feats % 2 != 0:
            raise ValueError(f"num_pos_feats must be a positive even number, got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset
        self.eps = eps

    def forward(
        self, padding_mask: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """
        Args:
            padding_mask: (B, H, W) bool, True on padding.
            dtype: computation and result dtype (at least float32 is used).

        Returns:
            (B, 2 * num_pos_feats, H, W) embedding.
        """
        dtype = torch.promote_types(dtype, torch.float32)
        valid = (~padding_mask).to(dtype)
        y_embed = valid.cumsum(1)
        x_embed = valid.cumsum(2)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=dtype, device=padding_mask.device)
        dim_t = self.temperature ** (
            2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats
        )
        pos_x = x_embed[..., None] / dim_t
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def get_sine_pos_embed(
    coordinates: torch.Tensor, num_pos_feats: int = 128, temperature: float = 10000.0
) -> torch.Tensor:
    """
    Sine embedding of normalized coordinates, used for decoder queries.

    Args:
        coordinates: (..., n) values in [0, 1]; n = 2 for (x, y) points, 4 for (cx, cy, w, h).
            Computed in the coordinates' dtype, at least float32.
        num_pos_feats: features per coordinate.
        temperature: base of the frequency ladder.

    Returns:
        (..., n * num_pos_feats) embedding ordered (y, x, w, h) like DINO's: y before x.
    """
    scale = 2 * math.pi
    dtype = torch.promote_types(coordinates.dtype, torch.float32)
    dim_t = torch.arange(num_pos_feats, dtype=dtype, device=coordinates.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)

    def embed(values: torch.Tensor) -> torch.Tensor:
        values = values.to(dtype)[..., None] * scale / dim_t
        return torch.stack((values[..., 0::2].sin(), values[..., 1::2].cos()), dim=-1).flatten(-2)

    parts = [embed(coordinates[..., index]) for index in range(coordinates.shape[-1])]
    if len(parts) >= 2:
        parts[0], parts[1] = parts[1], parts[0]
    return torch.cat(parts, dim=-1)
