"""Multi-scale deformable attention: input checks, dtype handling and choice of the backend.

Backends, chosen with :func:`set_msda_backend`, the :func:`msda_backend` context manager or the
environment variable ``FOCUS_DETR_MSDA_BACKEND`` (read at import):

- ``"auto"`` (default): the ``torch.library`` op ``focus_detr::ms_deform_attn``: the compiled
  CPU / CUDA kernels of ``focus_detr._C`` when loaded, its PyTorch implementation otherwise.
  The op is visible as one node to ``torch.compile``, ``torch.export`` and fvcore.
- ``"reference"``: :func:`multi_scale_deformable_attention_reference` called directly.
"""

import contextlib
import os
from typing import Iterator

import torch

from .ms_deform_attn_checks import check_inputs
from .ms_deform_attn_op import FORWARD_OP
from .ms_deform_attn_reference import multi_scale_deformable_attention_reference

__all__ = [
    "BACKEND_ENV",
    "get_msda_backend",
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
) -> torch.Tensor:
    """
    Bilinear sampling with zero padding (``align_corners=False``) of every level, weighted sum.

    Args:
        value: (B, Nv, H, D) values of all levels, flattened level after level.
        spatial_shapes: (L, 2) integer (height, width) of each level; sum(h * w) == Nv.
        level_start_index: (L,) integer offset of each level in ``value`` (exclusive cumulative
            sum of h * w).
        sampling_locations: (B, Nq, H, L, P, 2) normalized (x, y); (0, 0) is the top-left
            corner of a level and (1, 1) its bottom-right corner; outside [0, 1] samples zeros.
        attention_weights: (B, Nq, H, L, P) weights of the samples.

    Float16 / bfloat16 inputs are computed in float32 (also under ``torch.autocast``); the
    result has the promoted dtype of value, locations and weights. Non-contiguous inputs are
    made contiguous; int32 shapes and indices are converted to int64.

    Returns:
        (B, Nq, H * D) tensor.

    Raises:
        ValueError: inconsistent shapes, dtypes or devices (see :func:`check_inputs`).
    """
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
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
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    else:
        output = FORWARD_OP(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return output.to(output_dtype)
