"""The images the demo draws: files, folders, or the first images of the config's test set."""

import os
from typing import Iterable, List, Sequence, Union

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = [
    "DemoInputError",
    "IMAGE_EXTENSIONS",
    "find_images",
    "dataset_images",
    "dataset_metadata",
    "output_names",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class DemoInputError(Exception):
    """A problem with what the user asked for (a missing file, an empty folder, ...)."""


def find_images(paths: Iterable[str]) -> List[str]:
    """
    Args:
        paths: image files, or folders whose images (by extension, not recursive) are taken in
            sorted order.

    Returns:
        The image files, in the given order.
    """
    images = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(path, name)
                for name in os.listdir(path)
                if name.lower().endswith(IMAGE_EXTENSIONS)
                and os.path.isfile(os.path.join(path, name))
            )
            if not found:
                raise DemoInputError(
                    f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in folder {path}"
                )
            images.extend(found)
        elif os.path.isfile(path):
            images.append(path)
        else:
            hint = ""
            if "=" in path:
                hint = " (config overrides go before --input, or after '--')"
            raise DemoInputError(f"input not found: {path}{hint}")
    return images


def _dataset_names(names: Union[str, Sequence[str]]) -> List[str]:
    return [names] if isinstance(names, str) else [str(name) for name in names]


def dataset_images(names: Union[str, Sequence[str]], count: int) -> List[str]:
    """
    Args:
        names: registered dataset name(s), e.g. ``cfg.dataloader.test.dataset.names``.
        count: how many images, >= 1.

    Returns:
        The ``file_name`` of the first ``count`` records, datasets taken in order.
    """
    if count < 1:
        raise DemoInputError(f"--val-images must be >= 1, got {count}")
    files: List[str] = []
    for name in _dataset_names(names):
        if name not in DatasetCatalog.list():
            raise DemoInputError(
                f"dataset {name!r} (dataloader.test.dataset.names) is not registered"
            )
        records = DatasetCatalog.get(name)[: count - len(files)]
        files.extend(record["file_name"] for record in records)
        if len(files) >= count:
            break
    if not files:
        raise DemoInputError(f"no images found in dataset(s) {_dataset_names(names)}")
    return files


def dataset_metadata(names: Union[str, Sequence[str], None]):
    """The metadata (``thing_classes``) of the first registered dataset in ``names``, or None."""
    for name in _dataset_names(names or []):
        if name in DatasetCatalog.list():
            return MetadataCatalog.get(name)
    return None


def output_names(image_files: Sequence[str]) -> List[str]:
    """File stems, made unique with ``_1``, ``_2``, ... when two images share a stem."""
    names: List[str] = []
    used = set()
    for path in image_files:
        stem = os.path.splitext(os.path.basename(path))[0]
        name, suffix = stem, 1
        while name in used:
            name, suffix = f"{stem}_{suffix}", suffix + 1
        used.add(name)
        names.append(name)
    return names
