"""Data of focus_detr: the built-in synthetic shapes dataset and the resumable training loader.

Importing this package registers ``focus_detr_shapes_train`` (1000 images) and
``focus_detr_shapes_val`` (200 images) under the default root, like detectron2's builtin
datasets; nothing is generated until a split is first loaded. Call
:func:`register_synthetic_shapes` to change the root, the sizes or the seed.
"""

from .register_shapes import (
    DEFAULT_DATASET_PREFIX,
    prepare_synthetic_shapes,
    register_synthetic_shapes,
)
from .shape_drawing import CLASS_NAMES
from .synthetic_cache import default_root, ensure_synthetic_split
from .synthetic_shapes import SCALE_RANGE_NAMES, ShapesConfig
from .train_loader import SampleLoadError, build_resumable_train_loader

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_DATASET_PREFIX",
    "SCALE_RANGE_NAMES",
    "SampleLoadError",
    "ShapesConfig",
    "build_resumable_train_loader",
    "default_root",
    "ensure_synthetic_split",
    "prepare_synthetic_shapes",
    "register_synthetic_shapes",
]

register_synthetic_shapes()
