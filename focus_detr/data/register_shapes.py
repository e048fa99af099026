"""Registration of the synthetic shapes dataset in detectron2's catalogs.

Registering is free: nothing is generated until a split is first loaded through
``DatasetCatalog.get``, which generates the split into the cache if needed and then reads it
with detectron2's COCO loader. The metadata points at the JSON from the start (``json_file``,
``image_root``, ``evaluator_type="coco"``, ``thing_classes``), so ``COCOEvaluator`` works
unchanged once the split has been loaded (or :func:`prepare_synthetic_shapes` has run).
"""

import functools
import logging
import os
from typing import Dict, List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances

from .shape_drawing import CLASS_NAMES
from .synthetic_cache import default_root, ensure_synthetic_split, split_paths
from .synthetic_shapes import ShapesConfig

__all__ = ["DEFAULT_DATASET_PREFIX", "register_synthetic_shapes", "prepare_synthetic_shapes"]

logger = logging.getLogger(__name__)

DEFAULT_DATASET_PREFIX = "focus_detr_shapes"

# name -> (root, split, num_images, config) it was registered with: registering the same thing
# again is a no-op, and prepare_synthetic_shapes knows what to generate.
_REGISTERED: Dict[str, Tuple[str, str, int, ShapesConfig]] = {}


def _load_split(
    root: str, split: str, num_images: int, config: ShapesConfig, dataset_name: str
) -> List[Dict]:
    paths = ensure_synthetic_split(root, split=split, num_images=num_images, config=config)
    return load_coco_json(paths.json_file, paths.image_root, dataset_name)


def _split_sizes(num_train: int, num_val: int) -> Dict[str, int]:
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return {"train": num_train, "val": num_val}


def register_synthetic_shapes(
    root: Optional[str] = None,
    *,
    num_train: int = 1000,
    num_val: int = 200,
    seed: int = 0,
    min_size: int = 160,
    max_size: int = 320,
    train_long_side: int = 320,
    max_objects: int = 8,
    empty_fraction: float = 0.03,
    name_prefix: str = DEFAULT_DATASET_PREFIX,
) -> Dict[str, str]:
    """
    Register the train and val splits as ``{name_prefix}_train`` and ``{name_prefix}_val``
    through ``register_coco_instances``; generation is deferred to the first load.

    Calling it again with the same arguments does nothing; with other arguments it replaces the
    registration of those names.

    Args:
        root: dataset folder; default ``$DETECTRON2_DATASETS/focus_detr_shapes`` or
            ``./datasets/focus_detr_shapes`` when the variable is unset.
        num_train, num_val: number of images of each split, >= 1.
        seed: generation seed; the val split uses its own stream, never the train images.
        min_size, max_size: inclusive range of image widths and heights in pixels.
        train_long_side: image long side at training resolution, which sets the object sizes
            (see :mod:`focus_detr.data.synthetic_shapes`).
        max_objects: at most this many objects per image.
        empty_fraction: fraction of images without objects (default about 3%).
        name_prefix: prefix of the dataset names.

    Returns:
        ``{"train": train_dataset_name, "val": val_dataset_name}``.
    """
    sizes = _split_sizes(num_train, num_val)
    config = ShapesConfig(
        seed=seed,
        min_size=min_size,
        max_size=max_size,
        train_long_side=train_long_side,
        max_objects=max_objects,
        empty_fraction=empty_fraction,
    )
    root = default_root() if root is None else os.fspath(root)
    metadata = {
        "thing_classes": list(CLASS_NAMES),
        "thing_dataset_id_to_contiguous_id": {i + 1: i for i in range(len(CLASS_NAMES))},
    }
    names = {}
    for split, num_images in sizes.items():
        name = f"{name_prefix}_{split}"
        names[split] = name
        key = (root, split, num_images, config)
        if _REGISTERED.get(name) == key and name in DatasetCatalog.list():
            continue
        if name in DatasetCatalog.list():
            logger.info(f"Replacing the registration of dataset '{name}'")
            DatasetCatalog.remove(name)
        # Metadata cannot be overwritten with other values, so drop the old entry first.
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
        json_file, image_root, _ = split_paths(root, split)
        register_coco_instances(name, metadata, json_file, image_root)
        # register_coco_instances's loader only reads the JSON; swap in one that generates the
        # split first, keeping the metadata it set.
        DatasetCatalog.remove(name)
        DatasetCatalog.register(
            name, functools.partial(_load_split, root, split, num_images, config, name)
        )
        _REGISTERED[name] = key
    return names


def prepare_synthetic_shapes(*dataset_names: str) -> None:
    """
    Generate registered splits now instead of on first load, e.g. before building a
    ``COCOEvaluator``, which opens ``json_file`` in its constructor. Default: both default splits.
    """
    names = dataset_names or tuple(f"{DEFAULT_DATASET_PREFIX}_{s}" for s in ("train", "val"))
    for name in names:
        if name not in _REGISTERED:
            raise ValueError(f"'{name}' is not a registered synthetic shapes dataset")
        root, split, num_images, config = _REGISTERED[name]
        ensure_synthetic_split(root, split=split, num_images=num_images, config=config)
