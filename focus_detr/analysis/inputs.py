"""The images an analysis runs: one random image of a fixed size, or dataset images."""

import copy
import difflib
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog

from .models import AnalysisError

__all__ = ["MODEL_INPUT_KEYS", "dataset_inputs", "model_inputs", "random_inputs"]

# What the model reads of a dataset-mapper dict at inference.
MODEL_INPUT_KEYS = ("image", "height", "width")


def random_inputs(size: Tuple[int, int], *, seed: int = 0) -> Tuple[List[Dict], str]:
    """
    One random (3, H, W) uint8 image of ``size`` (the network input, not resized), and its
    description.
    """
    height, width = (int(value) for value in size)
    if height < 1 or width < 1:
        raise AnalysisError(f"image size must be positive, got {height}x{width}")
    generator = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
    return [{"image": image, "height": height, "width": width}], f"random {height}x{width} image"


def dataset_inputs(cfg, dataset_name: str, num_images: int) -> Tuple[List[Dict], str]:
    """
    The first ``num_images`` images of a registered dataset through the config's test mapper
    (``cfg.dataloader.test.mapper``). A ``DatasetMapper`` is built with ``is_train=True`` so
    that it keeps the ground truth (``instances`` in the resized image); with only
    deterministic test augmentations (resizing) the images are those the test loader gives.

    Returns:
        the mapped dicts and a description.

    Raises:
        AnalysisError: the dataset is not registered, has fewer images, or the config has no test
            mapper.
    """
    if num_images < 1:
        raise AnalysisError(f"num_images must be >= 1, got {num_images}")
    registered = DatasetCatalog.list()
    if dataset_name not in registered:
        close = difflib.get_close_matches(dataset_name, registered, n=5)
        raise AnalysisError(
            f"dataset {dataset_name!r} is not registered ({len(registered)} are"
            + (f"; close names: {close})" if close else ")")
        )
    mapper_cfg = getattr(getattr(cfg, "dataloader", None), "test", {}).get("mapper")
    if mapper_cfg is None:
        raise AnalysisError("the config has no dataloader.test.mapper to preprocess the images")
    mapper_cfg = copy.deepcopy(mapper_cfg)
    if "is_train" in mapper_cfg:
        mapper_cfg.is_train = True
    mapper = instantiate(mapper_cfg)
    dicts = DatasetCatalog.get(dataset_name)
    if len(dicts) < num_images:
        raise AnalysisError(
            f"dataset {dataset_name!r} has {len(dicts)} images, fewer than num_images="
            f"{num_images}"
        )
    inputs = [mapper(copy.deepcopy(record)) for record in dicts[:num_images]]
    sizes = sorted({tuple(item["image"].shape[-2:]) for item in inputs})
    shown = ", ".join(f"{h}x{w}" for h, w in sizes[:4]) + (", ..." if len(sizes) > 4 else "")
    return inputs, (
        f"first {num_images} image(s) of {dataset_name} through the config's test mapper "
        f"(network input sizes {shown})"
    )


def model_inputs(inputs: Sequence[Dict]) -> List[Dict]:
    """The inputs without ground truth or file names: only :data:`MODEL_INPUT_KEYS`."""
    return [{key: item[key] for key in MODEL_INPUT_KEYS if key in item} for item in inputs]
