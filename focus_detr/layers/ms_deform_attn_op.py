"""The ``torch.library`` ops ``focus_detr::ms_deform_attn`` and ``..._backward``.

Importing this module sets the ops up:

- the schemas and the CPU / CUDA kernels come from the compiled extension ``focus_detr._C``
  (loaded lazily, here, by :func:`load_extension`); when it cannot be loaded the schemas are
  defined in Python instead, after one warning;
- a PyTorch implementation (``grid_sample``, as the reference) is registered for every backend
  without a compiled kernel (the whole op when the extension is missing, CUDA tensors with a
  CPU-only build, ...);
- fake (meta) implementations, so that ``torch.compile`` and ``torch.export`` trace the op
  without running it;
- the autograd formula: the forward saves its inputs and the backward op computes the
  gradients of value, sampling locations and attention weights (first order only).

Callers should go through :func:`focus_detr.layers.multi_scale_deformable_attention`, which
validates the inputs and handles half precision; the ops expect float32 / float64 tensors of
one dtype, int64 shapes and indices, all on one device.
"""

from typing import Any, Tuple

import torch

from ._extension import load_extension
from .ms_deform_attn_fallback import multi_scale_deformable_attention_reference_backward
from .ms_deform_attn_reference import multi_scale_deformable_attention_reference

__all__ = ["FORWARD_OP", "BACKWARD_OP", "compiled_kernel_available"]

FORWARD_SCHEMA = (
    "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
    "Tensor sampling_locations, Tensor attention_weights) -> Tensor"
)
BACKWARD_SCHEMA = (
    "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
    "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) "
    "-> (Tensor, Tensor, Tensor)"
)


def _op_defined(name: str) -> bool:
    try:
        getattr(torch.ops.focus_detr, name)
    except (AttributeError, RuntimeError):
        return False
    return True


_EXTENSION = load_extension()
_LIB = torch.library.Library("focus_detr", "FRAGMENT")
if not _op_defined("ms_deform_attn"):
    _LIB.define(FORWARD_SCHEMA)
    _LIB.define(BACKWARD_SCHEMA)

FORWARD_OP = torch.ops.focus_detr.ms_deform_attn.default
BACKWARD_OP = torch.ops.focus_detr.ms_deform_attn_backward.default


def compiled_kernel_available(device: torch.device) -> bool:
    """True when ``focus_detr._C`` has a kernel for tensors of ``device`` (else: PyTorch)."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return (
        _EXTENSION is not None
        and key is not None
        and torch._C._dispatch_has_kernel_for_dispatch_key(FORWARD_OP.name(), key)
    )


# PyTorch implementation for the backends without a compiled kernel. CompositeExplicitAutograd
# ranks below the CPU / CUDA kernels of the extension, so it never shadows them.
_LIB.impl("ms_deform_attn", multi_scale_deformable_attention_reference, "CompositeExplicitAutograd")
_LIB.impl(
    "ms_deform_attn_backward",
    multi_scale_deformable_attention_reference_backward,
    "CompositeExplicitAutograd",
)


@torch.library.register_fake("focus_detr::ms_deform_attn")
def _forward_fake(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    batch, _, num_heads, head_dim = value.shape
    num_queries = sampling_locations.shape[1]
    return value.new_empty((batch, num_queries, num_heads * head_dim))


@torch.library.register_fake("focus_detr::ms_deform_attn_backward")
def _backward_fake(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    grad_output: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.empty_like(value, memory_format=torch.contiguous_format),
        torch.empty_like(sampling_locations, memory_format=torch.contiguous_format),
        torch.empty_like(attention_weights, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx: Any, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx: Any, grad_output: torch.Tensor) -> Tuple[Any, ...]:
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
        ctx.saved_tensors
    )
    grad_value, grad_locations, grad_weights = BACKWARD_OP(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        grad_output.contiguous(),
    )
    return grad_value, None, None, grad_locations, grad_weights


torch.library.register_autograd(
    "focus_detr::ms_deform_attn", _backward, setup_context=_setup_context
)
