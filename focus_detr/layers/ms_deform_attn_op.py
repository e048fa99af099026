"""The ``torch.library`` ops ``focus_detr::ms_deform_attn`` and ``..._backward``.

Importing this module sets the ops up:

- the compiled extension ``focus_detr._C`` is imported here, once; a failure to load it (not
  built, built for another torch, disabled with ``FOCUS_DETR_DISABLE_EXTENSION=1``) produces
  exactly one warning, and the schemas are then defined in Python;
- a PyTorch implementation (``grid_sample``, :mod:`.ms_deform_attn_reference`) is registered
  for every backend without a compiled kernel (the whole op when the extension is missing, CUDA
  tensors with a CPU-only build, ...);
- fake (meta) implementations, so that ``torch.compile`` and ``torch.export`` trace the op
  without running it;
- the autograd formula: the forward saves its inputs and the backward op computes the
  gradients of value, sampling locations and attention weights (first order only).

Callers should go through :func:`focus_detr.layers.multi_scale_deformable_attention`, which
validates the inputs and handles half precision; the ops expect float32 / float64 tensors of
one dtype, int64 shapes and indices, all on one device.
"""

import functools
import importlib
import os
import warnings
from types import ModuleType
from typing import Any, Optional, Tuple

import torch

from .ms_deform_attn_reference import (
    multi_scale_deformable_attention_reference,
    multi_scale_deformable_attention_reference_backward,
)

__all__ = [
    "BACKWARD_OP",
    "DISABLE_EXTENSION_ENV",
    "FORWARD_OP",
    "compiled_kernel_available",
    "extension_available",
    "extension_kernels",
    "extension_load_error",
]

DISABLE_EXTENSION_ENV = "FOCUS_DETR_DISABLE_EXTENSION"

FORWARD_SCHEMA = (
    "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
    "Tensor sampling_locations, Tensor attention_weights) -> Tensor"
)
BACKWARD_SCHEMA = (
    "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
    "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) "
    "-> (Tensor, Tensor, Tensor)"
)


@functools.lru_cache(maxsize=None)
def _import_extension() -> "tuple[Optional[ModuleType], str]":
    """(the ``focus_detr._C`` module or None, the reason it is None); tried once."""
    if os.environ.get(DISABLE_EXTENSION_ENV, "0") == "1":
        return None, f"{DISABLE_EXTENSION_ENV}=1"
    try:
        return importlib.import_module("focus_detr._C"), ""
    except (ImportError, OSError, RuntimeError) as error:
        # ImportError: not built; OSError / RuntimeError: built against another torch or CUDA.
        return None, f"{type(error).__name__}: {error}"


def extension_available() -> bool:
    """True when the compiled kernels of ``focus_detr._C`` are loaded."""
    return _import_extension()[0] is not None


def extension_load_error() -> str:
    """Why ``focus_detr._C`` is not loaded (e.g. ``"ImportError: ..."``); "" when it is."""
    return _import_extension()[1]


_EXTENSION, _LOAD_ERROR = _import_extension()
if _EXTENSION is None:
    warnings.warn(
        f"focus_detr._C could not be loaded ({_LOAD_ERROR}): using the PyTorch reference for "
        "multi-scale deformable attention",
        RuntimeWarning,
        stacklevel=2,
    )


def _op_defined(name: str) -> bool:
    try:
        getattr(torch.ops.focus_detr, name)
    except (AttributeError, RuntimeError):
        return False
    return True


_LIB = torch.library.Library("focus_detr", "FRAGMENT")
if not _op_defined("ms_deform_attn"):
    _LIB.define(FORWARD_SCHEMA)
    _LIB.define(BACKWARD_SCHEMA)

FORWARD_OP = torch.ops.focus_detr.ms_deform_attn.default
BACKWARD_OP = torch.ops.focus_detr.ms_deform_attn_backward.default

# Dispatch keys of the devices the extension may carry kernels for.
_DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def compiled_kernel_available(device: "torch.device | str") -> bool:
    """True when ``focus_detr._C`` has a kernel for tensors of ``device`` (else: PyTorch)."""
    key = _DEVICE_KEYS.get(torch.device(device).type)
    return (
        _EXTENSION is not None
        and key is not None
        and torch._C._dispatch_has_kernel_for_dispatch_key(FORWARD_OP.name(), key)
    )


def extension_kernels() -> Tuple[str, ...]:
    """The device types with compiled kernels, e.g. ``("cpu",)`` or ``("cpu", "cuda")``."""
    return tuple(device for device in _DEVICE_KEYS if compiled_kernel_available(device))


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
