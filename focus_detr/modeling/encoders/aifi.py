"""RT-DETR's attention-based intra-scale feature interaction (AIFI), 2-D sin-cos embedding."""

from typing import Optional

import torch
from torch import nn

from .hybrid_blocks import make_activation

__all__ = ["POSITION_LAYOUTS", "AIFILayer", "sincos_position_embedding_2d"]

# How the embedding table is laid over the row-major tokens of an (h, w) map (see
# sincos_position_embedding_2d).
POSITION_LAYOUTS = ("column_major", "row_major")


def sincos_position_embedding_2d(
    height: int,
    width: int,
    embed_dim: int,
    *,
    temperature: float = 10000.0,
    layout: str = "column_major",
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """
    RT-DETR's fixed 2-D sin-cos embedding of the cells of an ``height x width`` map, in cell
    units (not normalized). With ``d = embed_dim / 4`` frequencies
    ``omega_k = temperature ** (-k / d)``, token ``n`` (row-major, ``n = row * width + col``)
    gets ``[sin(a * omega), cos(a * omega), sin(b * omega), cos(b * omega)]`` (d features each)
    where

    - ``layout="column_major"`` (RT-DETR): ``a = n // height``, ``b = n % height``. RT-DETR
      flattens its (width, height) grid with the width outer while the tokens are flattened
      with the height outer: on a square map ``a`` is the row and ``b`` the column, on other
      maps ``a`` and ``b`` are not the cell's coordinates (e.g. on a 2 x 3 map the cell
      (row 0, col 2) gets ``a = 1, b = 0``);
    - ``layout="row_major"``: ``a = row = n // width``, ``b = col = n % width`` on every map:
      the same embedding as RT-DETR's on square maps.

    Args:
        height, width: map size (Python ints).
        embed_dim: channels; a multiple of 4.
        temperature: base of the frequency ladder (RT-DETR: 10000).
        layout: one of :data:`POSITION_LAYOUTS`.
        dtype: of the result; computed in at least float32.
        device: of the result.

    Returns:
        (height * width, embed_dim) embedding.
    """
    if embed_dim <= 0 or embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be a positive multiple of 4, got {embed_dim}")
    if layout not in POSITION_LAYOUTS:
        raise ValueError(f"layout must be one of {POSITION_LAYOUTS}, got {layout!r}")
    compute_dtype = torch.promote_types(dtype, torch.float32)
    num_freqs = embed_dim // 4
    exponents = torch.arange(num_freqs, dtype=compute_dtype, device=device) / num_freqs
    omega = temperature**-exponents
    index = torch.arange(height * width, dtype=torch.int64, device=device)
    divisor = height if layout == "column_major" else width
    first = torch.div(index, divisor, rounding_mode="floor").to(compute_dtype)[:, None] * omega
    second = (index % divisor).to(compute_dtype)[:, None] * omega
    embedding = torch.cat([first.sin(), first.cos(), second.sin(), second.cos()], dim=1)
    return embedding.to(dtype)


class AIFILayer(nn.Module):
    """
    RT-DETR's AIFI: a post-norm transformer encoder layer on the tokens of one map,

    1. ``x = LN(x + MHSA(x + p, x + p, x))``, the position embedding added to queries and keys;
    2. ``x = LN(x + FFN(x))``, FFN ``C -> ffn_dim -> C`` with ``activation`` (RT-DETR: GELU).

    Every module keeps PyTorch's own initialisation, as in RT-DETR.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        activation: str = "gelu",
    ):
        """
        Args:
            embed_dim: token channels.
            num_heads: attention heads; must divide ``embed_dim``.
            ffn_dim: hidden width of the FFN.
            dropout: on the attention weights, after the attention, inside and after the FFN.
            activation: of the FFN, a key of ``hybrid_blocks.ACTIVATIONS``.
        """
        super().__init__()
        if ffn_dim <= 0:
            raise ValueError(f"ffn_dim must be positive, got {ffn_dim}")
        if num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must divide embed_dim={embed_dim}")
        self.self_attn = nn.MultiheadAttention(
            embed_dim, num_heads, dropout=dropout, batch_first=True
        )
        self.attn_dropout = nn.Dropout(dropout)
        self.attn_norm = nn.LayerNorm(embed_dim)
        self.ffn = nn.Sequential(
            nn.Linear(embed_dim, ffn_dim),
            make_activation(activation),
            nn.Dropout(dropout),
            nn.Linear(ffn_dim, embed_dim),
            nn.Dropout(dropout),
        )
        self.ffn_norm = nn.LayerNorm(embed_dim)

    def forward(
        self,
        tokens: torch.Tensor,
        pos: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            tokens: (B, n, C) the map's tokens.
            pos: (n, C) or (B, n, C) position embedding, in ``tokens``' dtype.
            key_padding_mask: optional (B, n) bool, True on keys no token attends to (each row
                needs one False).

        Returns:
            (B, n, C) updated tokens.
        """
        with_pos = tokens + pos
        attended = self.self_attn(
            with_pos, with_pos, tokens, key_padding_mask=key_padding_mask, need_weights=False
        )[0]
        tokens = self.attn_norm(tokens + self.attn_dropout(attended))
        return self.ffn_norm(tokens + self.ffn(tokens))
