"""
Checks that run before training starts, so that bad input stops a run within seconds and with
an error naming the offending path or name, not hours later inside a loader worker.

* The output directory must be creatable, writable and readable.
* Every dataset name of ``dataloader.train`` and ``dataloader.test`` must be registered, and the
  datasets must load (annotation JSON present and well-formed).
* Every image file must exist (one ``stat`` per image: cheap even for COCO). For datasets of at
  most ``HEADER_CHECK_MAX_IMAGES`` images, each image's header is also read with PIL, which
  catches files that are not images at all, and images of a mode the reader cannot convert
  (:func:`focus_detr.data.read_image`), without decoding any pixel. Damage beyond the header
  (a truncated file) shows when the image is decoded, where the mapper raises
  :class:`~focus_detr.data.SampleLoadError` naming the file.
* Boxes that are not valid boxes (:mod:`focus_detr.data.boxes`) are dropped from the training
  dataset with one warning per dataset that counts them; in the test dataset they are counted
  too (the evaluator reads the ground truth as registered, where they stay).
"""

import difflib
import logging
import os
import tempfile
from typing import Dict, List, Optional, Sequence

from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from focus_detr.data import drop_invalid_boxes
from focus_detr.data.images import unsupported_mode

__all__ = [
    "HEADER_CHECK_MAX_IMAGES",
    "PreflightError",
    "check_dataset_names",
    "check_images",
    "check_output_dir",
    "load_dataset",
]

logger = logging.getLogger(__name__)

# Reading one header costs about 0.1 ms on a local disk: 2 s for 20k images.
HEADER_CHECK_MAX_IMAGES = 20000


class PreflightError(ValueError):
    """Training cannot start: an input or output path or a dataset name is wrong."""


def check_output_dir(path: str) -> None:
    """Create ``path`` if needed and make sure files can be written to and listed in it."""
    if not path:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise PreflightError(f"The output directory {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise PreflightError(
            f"Cannot create the output directory {path}: {error.strerror or error}"
        ) from error
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_check_") as probe:
            probe.write(b"ok")
            probe.flush()
        os.listdir(path)
    except OSError as error:
        raise PreflightError(
            f"The output directory {path} is not writable and readable: "
            f"{error.strerror or error}"
        ) from error


def _names(dataset_cfg) -> List[str]:
    names = dataset_cfg.get("names") if hasattr(dataset_cfg, "get") else None
    if names is None:
        return []
    return [names] if isinstance(names, str) else list(names)


def check_dataset_names(dataset_cfg, role: str) -> None:
    """Every name in ``dataset_cfg.names`` (``dataloader.{role}.dataset``) is registered."""
    registered = DatasetCatalog.list()
    for name in _names(dataset_cfg):
        if name not in registered:
            close = difflib.get_close_matches(name, registered, n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise PreflightError(
                f"dataloader.{role}.dataset.names: dataset '{name}' is not registered "
                f"({len(registered)} datasets are){hint} Register it (e.g. with "
                f"detectron2.data.datasets.register_coco_instances) before training"
            )


def load_dataset(dataset_cfg, role: str):
    """Instantiate ``dataloader.{role}.dataset``; a failure names the annotation files."""
    try:
        return instantiate(dataset_cfg)
    except Exception as error:
        names = _names(dataset_cfg)
        files = [MetadataCatalog.get(name).get("json_file", None) for name in names]
        files = [f for f in files if f]
        where = f" (annotation file {', '.join(files)})" if files else ""
        raise PreflightError(
            f"Cannot load the {role} dataset {', '.join(names) or dataset_cfg}{where}: "
            f"{type(error).__name__}: {error}"
        ) from error


def _is_local(path: str) -> bool:
    return "://" not in path


def check_images(
    records: Sequence[Dict], role: str, *, header_check_max_images: int = HEADER_CHECK_MAX_IMAGES
) -> None:
    """
    Every record's ``file_name`` exists; with at most ``header_check_max_images`` records, each
    one's header is also read (see the module doc). Remote paths (``scheme://``) are skipped.
    """
    paths = [r["file_name"] for r in records if "file_name" in r and _is_local(r["file_name"])]
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise PreflightError(
            f"{len(missing)} of the {len(paths)} images of the {role} dataset do not exist: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    if len(paths) > header_check_max_images:
        logger.info(
            f"{role} dataset: {len(paths)} images exist (headers not read above "
            f"{header_check_max_images} images; a bad image is reported when it is loaded)"
        )
        return
    for path in paths:
        try:
            with Image.open(path) as image:
                mode = image.mode
        except Exception as error:
            raise PreflightError(
                f"Image {path} of the {role} dataset cannot be read as an image: "
                f"{type(error).__name__}: {error}"
            ) from error
        reason = unsupported_mode(mode)
        if reason is not None:
            raise PreflightError(f"Image {path} of the {role} dataset cannot be read: {reason}")


def run_preflight(cfg, *, check_output: bool = True) -> Optional[list]:
    """
    All checks of the module doc on a LazyConfig; returns the loaded training dataset (so that
    it is not loaded twice) or None when ``dataloader.train`` has no ``dataset``.
    """
    if check_output:
        check_output_dir(cfg.train.output_dir)
    train_records = None
    for role in ("train", "test"):
        loader_cfg = cfg.dataloader.get(role)
        if loader_cfg is None or "dataset" not in loader_cfg:
            continue
        check_dataset_names(loader_cfg.dataset, role)
        records = load_dataset(loader_cfg.dataset, role)
        if isinstance(records, list):
            check_images(records, role)
            name = f"{', '.join(_names(loader_cfg.dataset)) or role} ({role})"
            records, dropped = drop_invalid_boxes(records, name)
            if dropped and role == "test":
                logger.warning(
                    f"The evaluation reads the ground truth of {name} as registered, with these "
                    f"{dropped} boxes: no detection can match them"
                )
        if role == "train":
            train_records = records
    return train_records
