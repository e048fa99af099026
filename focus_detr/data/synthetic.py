"""Command line tool for the synthetic shapes dataset: generate (or reuse) it and summarise it.

Usage::

    python3 -m focus_detr.data.synthetic --root DIR --num-train 1000 --num-val 200

prints, per split, the number of images (and of empty ones), the boxes per class and the
histogram of the detector's scale ranges at the training resolution.

The library entry points are re-exported here for convenience; ``focus_detr.data`` itself does
not import this module, so that ``python3 -m`` runs it cleanly.
"""

import argparse
import json
import logging
import sys
import time
from collections import Counter
from typing import Dict, List, Optional

from .register_shapes import prepare_synthetic_shapes, register_synthetic_shapes
from .shape_drawing import CLASS_NAMES
from .synthetic_cache import default_root, ensure_synthetic_split
from .synthetic_shapes import SCALE_RANGE_NAMES, ShapesConfig, scale_range_index

__all__ = [
    "main",
    "prepare_synthetic_shapes",
    "register_synthetic_shapes",
    "summarize_coco",
]


def summarize_coco(coco: Dict, *, train_long_side: int) -> Dict[str, object]:
    """
    Counts of a COCO-format dict made by the generator.

    Returns:
        dict with ``num_images``, ``num_empty_images``, ``num_boxes``, ``boxes_per_class``
        (class name -> count), ``scale_ranges`` (range name -> count of boxes, longest box side
        at the training resolution) and ``image_size_range`` ((min, max) of widths and heights).
    """
    images = {image["id"]: image for image in coco["images"]}
    names = {category["id"]: category["name"] for category in coco["categories"]}
    per_class = Counter({name: 0 for name in names.values()})
    scale_ranges = Counter({name: 0 for name in SCALE_RANGE_NAMES})
    annotated = set()
    for annotation in coco["annotations"]:
        image = images[annotation["image_id"]]
        annotated.add(annotation["image_id"])
        per_class[names[annotation["category_id"]]] += 1
        long_side = max(image["width"], image["height"])
        index = scale_range_index(max(annotation["bbox"][2:]), long_side, train_long_side)
        scale_ranges[SCALE_RANGE_NAMES[index]] += 1
    sides = [side for image in images.values() for side in (image["width"], image["height"])]
    return {
        "num_images": len(images),
        "num_empty_images": len(images) - len(annotated),
        "num_boxes": len(coco["annotations"]),
        "boxes_per_class": dict(per_class),
        "scale_ranges": dict(scale_ranges),
        "image_size_range": (min(sides), max(sides)),
    }


def _format_summary(split: str, summary: Dict[str, object]) -> str:
    low, high = summary["image_size_range"]
    lines = [
        f"[{split}] {summary['num_images']} images ({summary['num_empty_images']} empty), "
        f"{summary['num_boxes']} boxes, widths and heights in [{low}, {high}]",
        "  boxes per class: "
        + ", ".join(f"{name} {count}" for name, count in summary["boxes_per_class"].items()),
        "  longest box side at training resolution: "
        + ", ".join(f"{name}: {count}" for name, count in summary["scale_ranges"].items()),
    ]
    return "\n".join(lines)


def _parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    defaults = ShapesConfig()
    parser = argparse.ArgumentParser(
        prog="python3 -m focus_detr.data.synthetic",
        description="Generate (or reuse the cached) synthetic shapes dataset and summarise it.",
    )
    parser.add_argument("--root", default=None, help=f"dataset folder (default {default_root()})")
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--min-size", type=int, default=defaults.min_size)
    parser.add_argument("--max-size", type=int, default=defaults.max_size)
    parser.add_argument("--train-long-side", type=int, default=defaults.train_long_side)
    parser.add_argument("--max-objects", type=int, default=defaults.max_objects)
    parser.add_argument("--empty-fraction", type=float, default=defaults.empty_fraction)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """CLI entry point; returns the exit status."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        config = ShapesConfig(
            seed=args.seed,
            min_size=args.min_size,
            max_size=args.max_size,
            train_long_side=args.train_long_side,
            max_objects=args.max_objects,
            empty_fraction=args.empty_fraction,
        )
        for name, value in (("--num-train", args.num_train), ("--num-val", args.num_val)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    root = default_root() if args.root is None else args.root
    for split, num_images in (("train", args.num_train), ("val", args.num_val)):
        start = time.perf_counter()
        paths = ensure_synthetic_split(root, split=split, num_images=num_images, config=config)
        elapsed = time.perf_counter() - start
        with open(paths.json_file, "r", encoding="utf-8") as f:
            summary = summarize_coco(json.load(f), train_long_side=config.train_long_side)
        print(_format_summary(split, summary))
        print(f"  annotations: {paths.json_file}, images: {paths.image_root} ({elapsed:.1f} s)")
    print(f"classes: {', '.join(CLASS_NAMES)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
