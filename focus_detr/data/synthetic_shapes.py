"""Generation of the synthetic shapes detection dataset: images and COCO-format annotations.

Object sizes are a function of the image size. The detector assigns an object to one of four
foreground scale ranges by the longest side of its box at the *training* resolution: <=64,
64-128, 128-256 and >256 pixels. The demo trains on images resized so that their long side is
about ``train_long_side`` (320 by default), so an object whose longest side is the fraction ``f``
of its image's long side has the longest side ``f * train_long_side`` when trained on. Each
object first draws a scale range (weights 0.3, 0.3, 0.25, 0.15 from small to large), then a
longest side inside that range (at least 16 pixels at the training resolution), converted back to
the generated image by the same fraction.
Elongated images cannot hold the largest objects at every aspect ratio, so some of those land in
the range below; the CLI summary prints the histogram that results.
"""

import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from .shape_drawing import (
    CLASS_NAMES,
    add_sensor_noise,
    draw_background,
    render_shape_mask,
    sample_object_colour,
)

__all__ = [
    "GENERATOR_VERSION",
    "SCALE_RANGE_EDGES",
    "SCALE_RANGE_NAMES",
    "ShapesConfig",
    "coco_categories",
    "generate_split",
    "render_image",
    "scale_range_index",
]

logger = logging.getLogger(__name__)

# Bump whenever a change alters the generated pixels or annotations: it invalidates caches.
GENERATOR_VERSION = 2
SCALE_RANGE_EDGES = (64, 128, 256)
SCALE_RANGE_NAMES = ("<=64", "64-128", "128-256", ">256")
_SCALE_RANGE_WEIGHTS = (0.3, 0.3, 0.25, 0.15)
# the smallest objects measure at least this long side at the training resolution: a detector
# trained from scratch in minutes cannot learn shapes of a few pixels
_MIN_TRAIN_SIDE = 16
_MIN_OBJECT_SIDE = 6  # pixels in the generated image; smaller shapes lose their outline
_MAX_ASPECT = 4.0 / 3.0  # objects are stretched by at most this much, either way
_PLACEMENT_TRIES = 20
_NOISE_STD = 6.0


@dataclass(frozen=True)
class ShapesConfig:
    """
    Parameters of the generated images; the split sizes are passed separately.

    Attributes:
        seed: non-negative seed; the same seed gives byte-identical annotations and pixels.
        min_size, max_size: inclusive range of image widths and heights, drawn independently,
            so the aspect ratio varies too. ``min_size >= 32``.
        train_long_side: long side of the images at the training resolution, which ties the
            object sizes to the detector's scale ranges (see the module docstring).
        max_objects: at most this many objects per image (at least one in non-empty images).
        empty_fraction: fraction of the images with no objects, in [0, 1).
        max_occlusion: an object is not placed if it would hide more than this fraction of an
            earlier object; in (0, 1).
    """

    seed: int = 0
    min_size: int = 160
    max_size: int = 320
    train_long_side: int = 320
    max_objects: int = 8
    empty_fraction: float = 0.03
    max_occlusion: float = 0.7

    def __post_init__(self):
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.min_size < 32:
            raise ValueError(f"min_size must be >= 32, got {self.min_size}")
        if self.min_size > self.max_size:
            raise ValueError(
                f"min_size must be <= max_size, got min_size={self.min_size}, "
                f"max_size={self.max_size}"
            )
        if self.train_long_side < 32:
            raise ValueError(f"train_long_side must be >= 32, got {self.train_long_side}")
        if self.max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {self.max_objects}")
        if not 0.0 <= self.empty_fraction < 1.0:
            raise ValueError(f"empty_fraction must be in [0, 1), got {self.empty_fraction}")
        if not 0.0 < self.max_occlusion < 1.0:
            raise ValueError(f"max_occlusion must be in (0, 1), got {self.max_occlusion}")

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


def scale_range_index(max_side: float, image_long_side: int, train_long_side: int) -> int:
    """Index (0..3) of the scale range of a box whose longest side is ``max_side`` pixels in an
    image whose long side is ``image_long_side``, measured at the training resolution."""
    side_at_training = max_side * train_long_side / image_long_side
    return int(np.searchsorted(SCALE_RANGE_EDGES, side_at_training, side="left"))


def coco_categories() -> List[Dict[str, object]]:
    """COCO ``categories``: ids 1..K in the order of :data:`CLASS_NAMES`."""
    return [
        {"id": index + 1, "name": name, "supercategory": "shape"}
        for index, name in enumerate(CLASS_NAMES)
    ]


def _split_key(split: str) -> int:
    # A stable hash (unlike hash()), so every split name gets its own reproducible stream.
    return zlib.crc32(split.encode("utf-8"))


def _sample_box_size(
    image_w: int, image_h: int, config: ShapesConfig, rng: np.random.Generator
) -> Tuple[int, int]:
    long_side = max(image_w, image_h)
    to_image = long_side / config.train_long_side
    range_index = int(rng.choice(len(SCALE_RANGE_EDGES) + 1, p=_SCALE_RANGE_WEIGHTS))
    low = (_MIN_TRAIN_SIDE if range_index == 0 else SCALE_RANGE_EDGES[range_index - 1]) * to_image
    high = long_side if range_index == 3 else SCALE_RANGE_EDGES[range_index] * to_image
    high = max(high, _MIN_OBJECT_SIDE + 1)
    # With a small train_long_side the upper ranges would exceed the image: cap them at its size.
    low = min(max(low, _MIN_OBJECT_SIDE), high)
    max_side = rng.uniform(low, high)
    if range_index == 3:
        # The largest objects only fit when shaped like the image.
        aspect = float(np.clip(image_w / image_h, 1 / _MAX_ASPECT, _MAX_ASPECT))
    else:
        aspect = float(np.exp(rng.uniform(-np.log(_MAX_ASPECT), np.log(_MAX_ASPECT))))
    box_w, box_h = (max_side, max_side / aspect) if aspect >= 1 else (max_side * aspect, max_side)
    fit = min(1.0, image_w / box_w, image_h / box_h)
    box_w = int(np.clip(round(box_w * fit), _MIN_OBJECT_SIDE // 2, image_w))
    box_h = int(np.clip(round(box_h * fit), _MIN_OBJECT_SIDE // 2, image_h))
    return box_w, box_h


def _paint_object(
    pixels: np.ndarray, mask: np.ndarray, x0: int, y0: int, colour: np.ndarray, rng
) -> None:
    """Fill ``mask`` at (x0, y0) with ``colour`` under a mild linear shading, so objects are
    not flat patches of a single value."""
    height, width = mask.shape
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (xs / width - 0.5) * np.cos(angle) + (ys / height - 0.5) * np.sin(angle)
    fill = colour[None, None, :] * (1.0 + rng.uniform(0.1, 0.3) * ramp)[..., None]
    region = pixels[y0 : y0 + height, x0 : x0 + width]
    region[mask] = fill[mask]


def render_image(
    index: int, *, split: str, config: ShapesConfig, empty: bool = False
) -> Tuple[np.ndarray, List[Dict[str, object]]]:
    """
    Draw image ``index`` of ``split``. Each image has its own generator seeded by
    ``(config.seed, split, index)``, so an image does not depend on the others or on the order.

    Objects are placed from the largest to the smallest, each on top of the earlier ones; a
    placement that would hide more than ``config.max_occlusion`` of an earlier object is retried
    elsewhere and the object is dropped after a few tries.

    Returns:
        the image, uint8 (H, W, 3), and its objects as dicts with ``category_index`` (0-based),
        ``bbox`` [x, y, w, h] (the full object box, also where occluded) and ``area`` (pixels of
        the full object).
    """
    rng = np.random.default_rng([config.seed, _split_key(split), index])
    width = int(rng.integers(config.min_size, config.max_size + 1))
    height = int(rng.integers(config.min_size, config.max_size + 1))
    pixels = draw_background(height, width, rng)
    if empty:
        return add_sensor_noise(pixels, rng, std=_NOISE_STD), []

    num_objects = int(rng.integers(1, config.max_objects + 1))
    sizes = [_sample_box_size(width, height, config, rng) for _ in range(num_objects)]
    sizes.sort(key=lambda size: max(size), reverse=True)
    owner = np.full((height, width), -1, dtype=np.int32)  # index of the topmost object
    full_areas: List[int] = []
    visible_areas: List[int] = []
    objects: List[Dict[str, object]] = []
    for box_w, box_h in sizes:
        class_index = int(rng.integers(len(CLASS_NAMES)))
        mask = render_shape_mask(class_index, box_w, box_h, rng)
        colour = sample_object_colour(class_index, rng)
        for _ in range(_PLACEMENT_TRIES):
            x0 = int(rng.integers(0, width - box_w + 1))
            y0 = int(rng.integers(0, height - box_h + 1))
            below = owner[y0 : y0 + box_h, x0 : x0 + box_w][mask]
            covered = np.bincount(below[below >= 0], minlength=len(full_areas))
            remaining = np.asarray(visible_areas, dtype=np.int64) - covered
            if np.all(remaining >= (1.0 - config.max_occlusion) * np.asarray(full_areas)):
                break
        else:
            continue
        _paint_object(pixels, mask, x0, y0, colour, rng)
        owner[y0 : y0 + box_h, x0 : x0 + box_w][mask] = len(full_areas)
        visible_areas = list(remaining) + [int(mask.sum())]
        full_areas.append(int(mask.sum()))
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        bbox = [x0 + int(cols[0]), y0 + int(rows[0]), int(cols[-1] - cols[0] + 1)]
        bbox.append(int(rows[-1] - rows[0] + 1))
        objects.append({"category_index": class_index, "bbox": bbox, "area": full_areas[-1]})
    return add_sensor_noise(pixels, rng, std=_NOISE_STD), objects


def _render_and_save(
    index: int, *, image_dir: str, split: str, config: ShapesConfig, empty: bool
) -> Dict[str, object]:
    """Draw image ``index``, write it and return its COCO image entry plus its ``objects``."""
    pixels, objects = render_image(index, split=split, config=config, empty=empty)
    file_name = f"{index:06d}.png"
    # compress_level=0 (stored, filtered): the noisy images shrink by only ~30% at level 1, which
    # took 2x longer to write and 6x longer to read in every training step.
    Image.fromarray(pixels).save(os.path.join(image_dir, file_name), compress_level=0)
    height, width = pixels.shape[:2]
    image = {"id": index + 1, "file_name": file_name, "width": width, "height": height}
    return {"image": image, "objects": objects}


def generate_split(
    image_dir: str,
    *,
    split: str,
    num_images: int,
    config: ShapesConfig,
    log_every: int = 200,
    workers: Optional[int] = None,
) -> Dict[str, object]:
    """
    Render ``num_images`` images of ``split`` as PNG files ``{index:06d}.png`` in ``image_dir``
    and return their COCO-format annotations (not written: the cache writes them).

    About ``config.empty_fraction * num_images`` (rounded) images, picked by the seed, have no
    objects. Progress is logged every ``log_every`` images. ``workers`` threads draw and write
    the images (default: the CPUs this process may use, at most 4); every image has its own
    generator, so the output does not depend on it.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if workers is None:
        workers = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    os.makedirs(image_dir, exist_ok=True)
    split_rng = np.random.default_rng([config.seed, _split_key(split)])
    num_empty = int(round(config.empty_fraction * num_images))
    empty = set(split_rng.choice(num_images, size=num_empty, replace=False).tolist())
    images: List[Dict[str, object]] = []
    annotations: List[Dict[str, object]] = []

    def job(index: int):
        return _render_and_save(
            index, image_dir=image_dir, split=split, config=config, empty=index in empty
        )

    # numpy and PIL's PNG writer release the GIL for most of an image's work
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for index, drawn in enumerate(pool.map(job, range(num_images))):
            images.append(drawn["image"])
            for obj in drawn["objects"]:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": drawn["image"]["id"],
                        "category_id": obj["category_index"] + 1,
                        "bbox": obj["bbox"],
                        "area": float(obj["area"]),
                        "iscrowd": 0,
                    }
                )
            if (index + 1) % log_every == 0 or index + 1 == num_images:
                logger.info(f"Synthetic shapes '{split}': {index + 1}/{num_images} images")
    return {
        "info": {"description": "focus_detr synthetic shapes", "version": GENERATOR_VERSION},
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(),
    }
