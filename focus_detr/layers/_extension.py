"""Lazy loading of the compiled extension ``focus_detr._C``.

Nothing in ``focus_detr`` imports ``focus_detr._C`` directly: :func:`load_extension` is called
once, when the deformable attention op is set up, and a failure to load it (not built, built
for another torch, disabled with ``FOCUS_DETR_DISABLE_EXTENSION=1``) produces exactly one
warning; the PyTorch implementation is used instead.
"""

import functools
import importlib
import os
import warnings
from types import ModuleType
from typing import Optional

import torch  # noqa: F401  (the extension links against libtorch: load it first)

__all__ = ["DISABLE_EXTENSION_ENV", "extension_available", "load_extension"]

DISABLE_EXTENSION_ENV = "FOCUS_DETR_DISABLE_EXTENSION"


@functools.lru_cache(maxsize=None)
def _load() -> "tuple[Optional[ModuleType], str]":
    if os.environ.get(DISABLE_EXTENSION_ENV, "0") == "1":
        return None, f"{DISABLE_EXTENSION_ENV}=1"
    try:
        return importlib.import_module("focus_detr._C"), ""
    except (ImportError, OSError, RuntimeError) as error:
        # ImportError: not built; OSError / RuntimeError: built against another torch or CUDA.
        return None, f"{type(error).__name__}: {error}"


@functools.lru_cache(maxsize=None)
def load_extension() -> Optional[ModuleType]:
    """
    Returns:
        the ``focus_detr._C`` module, or None (after one warning saying why) when it cannot be
        loaded. The result is cached: the import is tried, and the warning emitted, once.
    """
    module, reason = _load()
    if module is None:
        warnings.warn(
            f"focus_detr._C could not be loaded ({reason}): using the PyTorch reference for "
            "multi-scale deformable attention",
            RuntimeWarning,
            stacklevel=2,
        )
    return module


def extension_available() -> bool:
    """True when the compiled kernels are loaded (without warning when they are not)."""
    return _load()[0] is not None
