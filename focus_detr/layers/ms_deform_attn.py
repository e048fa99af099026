"""Multi-scale deformable attention (Deformable DETR), batch first: the op and the module.

:func:`multi_scale_deformable_attention` checks its inputs, handles half precision and picks the
backend, chosen with :func:`set_msda_backend`, the :func:`msda_backend` context manager or the
environment variable ``FOCUS_DETR_MSDA_BACKEND`` (read at import):

- ``"auto"`` (default): the ``torch.library`` op ``focus_detr::ms_deform_attn``: the compiled
  CPU / CUDA kernels of ``focus_detr._C`` when loaded, its PyTorch implementation otherwise.
  The op is visible as one node to ``torch.compile``, ``torch.export`` and fvcore.
- ``"reference"``: :func:`multi_scale_deformable_attention_reference` called directly.

Samples outside their level read zeros; samples at non-finite locations contribute nothing and
non-finite attention weights count as NaN (see :mod:`.ms_deform_attn_reference`).
"""

import contextlib
import math
import os
from typing import Iterator, Optional, Tuple, Union

import torch
from torch import nn

from .ms_deform_attn_checks import (
    LevelShapes,
    check_inputs,
    check_module_inputs,
    check_module_sizes,
)
from .ms_deform_attn_op import FORWARD_OP
from .ms_deform_attn_reference import multi_scale_deformable_attention_reference

__all__ = [
    "BACKEND_ENV",
    "MultiScaleDeformableAttention",
    "deformable_sampling_locations",
    "get_msda_backend",
    "init_sampling_offsets",
    "msda_backend",
    "multi_scale_deformable_attention",
    "set_msda_backend",
]

BACKEND_ENV = "FOCUS_DETR_MSDA_BACKEND"
_BACKENDS = ("auto", "reference")


def _checked_backend(name: str) -> str:
    if name not in _BACKENDS:
        raise ValueError(
            f"Unknown deformable attention backend {name!r}, expected one of {_BACKENDS}"
        )
    return name


_backend = _checked_backend(os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto")


def get_msda_backend() -> str:
    """The backend used by :func:`multi_scale_deformable_attention`: "auto" or "reference"."""
    return _backend


def set_msda_backend(name: str) -> None:
    """Select the backend ("auto" or "reference") for the whole process."""
    global _backend
    _backend = _checked_backend(name)


@contextlib.contextmanager
def msda_backend(name: str) -> Iterator[None]:
    """Use the backend ``name`` ("auto" or "reference") inside a ``with`` block."""
    previous = get_msda_backend()
    set_msda_backend(name)
    try:
        yield
    finally:
        set_msda_backend(previous)


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    level_shapes: Optional[LevelShapes] = None,
) -> torch.Tensor:
    """
    Bilinear sampling with zero padding (``align_corners=False``) of every level, weighted sum.

    Args:
        value: (B, Nv, H, D) values of all levels, flattened level after level.
        spatial_shapes: (L, 2) integer (height, width) of each level; sum(h * w) == Nv.
        level_start_index: (L,) integer offset of each level in ``value`` (exclusive cumulative
            sum of h * w).
        sampling_locations: (B, Nq, H, L, P, 2) normalized (x, y); (0, 0) is the top-left
            corner of a level and (1, 1) its bottom-right corner; outside [0, 1] samples zeros,
            a NaN or infinite location contributes nothing.
        attention_weights: (B, Nq, H, L, P) weights of the samples; a NaN or infinite weight of
            a sample inside its level makes the output of its query and head NaN.
        level_shapes: the (h, w) of every level as Python ints, given by a caller that made
            ``spatial_shapes`` and ``level_start_index`` from them (as ``FlattenedFeatures``
            does): the level sizes are then checked against ``value`` on these ints and the
            tensors are not read back (no synchronisation with the device). Without them the
            tensors' contents are read and checked in eager mode.

    Float16 / bfloat16 inputs are computed in float32 (also under ``torch.autocast``); the
    result has the promoted dtype of value, locations and weights. Non-contiguous inputs are
    made contiguous; int32 shapes and indices are converted to int64.

    Returns:
        (B, Nq, H * D) tensor.

    Raises:
        ValueError: inconsistent shapes, dtypes or devices (see :func:`check_inputs`).
    """
    check_inputs(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        level_shapes,
    )
    output_dtype = torch.promote_types(
        torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype
    )
    compute_dtype = (
        torch.float32 if output_dtype in (torch.float16, torch.bfloat16) else output_dtype
    )
    value = value.to(compute_dtype).contiguous()
    sampling_locations = sampling_locations.to(compute_dtype).contiguous()
    attention_weights = attention_weights.to(compute_dtype).contiguous()
    spatial_shapes = spatial_shapes.to(torch.int64).contiguous()
    level_start_index = level_start_index.to(torch.int64).contiguous()
    if _backend == "reference":
        output = multi_scale_deformable_attention_reference(
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            level_shapes,
        )
    else:
        output = FORWARD_OP(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return output.to(output_dtype)


def init_sampling_offsets(
    linear: nn.Linear, *, num_heads: int, num_levels: int, num_points: int
) -> None:
    """
    Deformable DETR's initialisation of the offset projection: zero weight, bias on a ring of
    unit directions (one per head, scaled to the unit square) times point index + 1.

    Args:
        linear: ``nn.Linear(C, num_heads * num_levels * num_points * 2)``.
    """
    nn.init.zeros_(linear.weight)
    angles = torch.arange(num_heads, dtype=torch.float32) * (2.0 * math.pi / num_heads)
    directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
    directions = directions / directions.abs().max(dim=-1, keepdim=True).values
    scale = torch.arange(1, num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
    bias = directions.view(num_heads, 1, 1, 2).repeat(1, num_levels, num_points, 1)
    with torch.no_grad():
        linear.bias.copy_((bias * scale).flatten())


def deformable_sampling_locations(
    reference_points: torch.Tensor, offsets: torch.Tensor, spatial_shapes: torch.Tensor
) -> torch.Tensor:
    """
    Args:
        reference_points: (B, Nq, L, 2) normalized (x, y) points or (B, Nq, L, 4) normalized
            (cx, cy, w, h) boxes.
        offsets: (B, Nq, H, L, P, 2) predicted offsets.
        spatial_shapes: (L, 2) (height, width) of each level.

    Returns:
        (B, Nq, H, L, P, 2) normalized (x, y): for points, ``point + offset / (w_l, h_l)``
        (offsets in cells of each level); for boxes, ``centre + offset / P * size / 2``.
    """
    if reference_points.shape[-1] == 2:
        normalizer = spatial_shapes.flip(-1).to(offsets.dtype)  # (L, 2): (w, h)
        return (
            reference_points[:, :, None, :, None, :]
            + offsets / normalizer[None, None, None, :, None, :]
        )
    num_points = offsets.shape[4]
    return (
        reference_points[:, :, None, :, None, :2]
        + offsets / num_points * reference_points[:, :, None, :, None, 2:] * 0.5
    )


class MultiScaleDeformableAttention(nn.Module):
    """
    Each query samples ``num_points`` locations per head and level around its reference point
    and returns their weighted sum, projected back to ``embed_dim``. No residual, no dropout:
    the calling layer adds them.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
    ):
        """
        Args:
            embed_dim: channels of queries and values; must be divisible by ``num_heads``.
            num_heads: attention heads.
            num_levels: feature levels sampled by every query.
            num_points: sampling points per head and level.
        """
        super().__init__()
        check_module_sizes(embed_dim, num_heads, num_levels, num_points)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets on the ring of :func:`init_sampling_offsets`, uniform attention weights."""
        init_sampling_offsets(
            self.sampling_offsets,
            num_heads=self.num_heads,
            num_levels=self.num_levels,
            num_points=self.num_points,
        )
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        value_padding_mask: Optional[torch.Tensor] = None,
        return_sampling: bool = False,
        *,
        level_shapes: Optional[LevelShapes] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """
        Args:
            query: (B, Nq, C) queries, position embedding already added.
            reference_points: (B, Nq, L, 2) normalized (x, y) points, or (B, Nq, L, 4)
                normalized (cx, cy, w, h) boxes; offsets are then scaled by half the box size.
            value: (B, Nv, C) flattened multi-scale features, Nv = sum of h * w.
            spatial_shapes: (L, 2) int64 (h, w) of every level.
            level_start_index: (L,) int64 offset of every level in ``value``.
            value_padding_mask: (B, Nv) bool, True where ``value`` is padding (zeroed).
            return_sampling: also return the sampling locations and attention weights.
            level_shapes: the contents of ``spatial_shapes`` as Python ints, from a caller that
                made the tensors from them: they are then not read back (see
                :func:`multi_scale_deformable_attention`).

        Returns:
            (B, Nq, C) attention output; with ``return_sampling``, the tuple (output,
            sampling_locations (B, Nq, H, L, P, 2) normalized (x, y), attention_weights
            (B, Nq, H, L, P), softmax-normalized over the L * P samples of every head).
        """
        check_module_inputs(
            self, query, reference_points, value, spatial_shapes, value_padding_mask
        )
        batch, num_queries, _ = query.shape
        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(batch, value.shape[1], self.num_heads, self.embed_dim // self.num_heads)
        offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.num_heads, self.num_levels, self.num_points, 2
        )
        weights = self.attention_weights(query).view(
            batch, num_queries, self.num_heads, self.num_levels * self.num_points
        )
        weights = weights.softmax(-1).view(
            batch, num_queries, self.num_heads, self.num_levels, self.num_points
        )
        locations = deformable_sampling_locations(reference_points, offsets, spatial_shapes)
        output = multi_scale_deformable_attention(
            value, spatial_shapes, level_start_index, locations, weights, level_shapes=level_shapes
        )
        output = self.output_proj(output)
        if return_sampling:
            return output, locations, weights
        return output
