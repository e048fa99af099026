"""
Data of focus_detr: the built-in synthetic shapes dataset, the resumable training loader, and the
dataset mapper with its image reader and box checks.

Importing this package registers ``focus_detr_shapes_train`` (1000 images) and
``focus_detr_shapes_val`` (200 images) under the default root, like detectron2's builtin
datasets; nothing is generated until a split is first loaded. Call
:func:`register_synthetic_shapes` to change the root, the sizes or the seed.
"""

from .boxes import drop_invalid_boxes, invalid_box_reason
from .images import ImageReadError, read_image
from .mapper import DatasetMapper, SampleLoadError
from .register_shapes import (
    DEFAULT_DATASET_PREFIX,
    prepare_synthetic_shapes,
    register_synthetic_shapes,
)
from .shape_drawing import CLASS_NAMES
from .synthetic_cache import default_root, ensure_synthetic_split
from .synthetic_shapes import SCALE_RANGE_NAMES, ShapesConfig
from .train_loader import build_resumable_train_loader

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_DATASET_PREFIX",
    "DatasetMapper",
    "ImageReadError",
    "SCALE_RANGE_NAMES",
    "SampleLoadError",
    "ShapesConfig",
    "build_resumable_train_loader",
    "default_root",
    "drop_invalid_boxes",
    "ensure_synthetic_split",
    "invalid_box_reason",
    "prepare_synthetic_shapes",
    "read_image",
    "register_synthetic_shapes",
]

register_synthetic_shapes()
