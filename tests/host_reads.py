"""
A ``TorchFunctionMode`` that records every read of a tensor's values back into Python.

On a GPU each such read (``.item()``, ``.tolist()``, ``int(t)``, ``if t.any():``, a boolean-mask
index, ``nonzero()``, ...) waits for the device to finish all queued work. On the CPU they cost
nothing visible, so the tests count them here instead.
"""

import traceback
from collections import Counter
from typing import List, Tuple

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HostReadCounter"]

_TENSOR_READS = (
    "tolist",
    "item",
    "numpy",
    "cpu",
    "nonzero",
    "argwhere",
    "unique",
    "unique_consecutive",
    "masked_select",
    "__bool__",
    "__int__",
    "__float__",
    "__complex__",
    "__index__",
    "__array__",
    "__repr__",
    "__format__",
)
# Functions whose result depends on the data in a way that needs the values on the host first
# (an output size given by the data).
_FUNCTION_READS = (
    torch.nonzero,
    torch.argwhere,
    torch.unique,
    torch.unique_consecutive,
    torch.masked_select,
    torch.bincount,
)
_READS = frozenset(getattr(torch.Tensor, name) for name in _TENSOR_READS) | frozenset(
    _FUNCTION_READS
)


def _is_boolean_index(index) -> bool:
    if isinstance(index, tuple):
        return any(_is_boolean_index(part) for part in index)
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _is_read(func, args, kwargs) -> bool:
    if func in _READS:
        return True
    if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
        # a boolean mask selects a data-dependent number of elements
        return len(args) > 1 and _is_boolean_index(args[1])
    if func is torch.where:
        return len(args) + len(kwargs) == 1  # torch.where(condition) is nonzero()
    if func is torch.repeat_interleave or func is torch.Tensor.repeat_interleave:
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and "output_size" not in kwargs
    if func is torch.Tensor.to:
        # a copy from an accelerator to the host (to(device) of a CPU tensor is no read)
        return args[0].device.type != "cpu" and any(
            isinstance(arg, (str, torch.device)) and torch.device(arg).type == "cpu"
            for arg in list(args[1:]) + [kwargs.get("device")]
            if arg is not None and not isinstance(arg, torch.dtype)
        )
    return False


class HostReadCounter(TorchFunctionMode):
    """
    Inside ``with HostReadCounter() as counter:``, every read of tensor values back into Python
    is recorded: ``counter.count`` is their number and ``counter.reads`` says what and where
    (the innermost frame of the ``focus_detr`` package, or of the caller when none).
    """

    def __init__(self):
        super().__init__()
        self.reads: List[Tuple[str, str]] = []

    @property
    def count(self) -> int:
        return len(self.reads)

    def summary(self) -> Counter:
        """``{(function, location): count}``."""
        return Counter(self.reads)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_read(func, args, kwargs):
            self.reads.append((getattr(func, "__name__", str(func)), _location()))
        return func(*args, **kwargs)


def _location() -> str:
    frames = traceback.extract_stack()[:-2]
    for frame in reversed(frames):
        if "/focus_detr/" in frame.filename and "/tests/" not in frame.filename:
            return f"{frame.filename.split('/focus_detr/')[-1]}:{frame.lineno}"
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno}"
