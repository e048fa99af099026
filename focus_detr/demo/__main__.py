"""Command line of the demo: ``python -m focus_detr.demo --help``."""

import argparse
import logging
import os
import sys
from typing import List, Optional

import torch

from focus_detr.engine.overrides import ConfigOverrideError

from .inputs import DemoInputError, dataset_images, dataset_metadata, find_images
from .predictor import FocusDETRPredictor, load_config
from .runner import run_demo

EXAMPLE = """example:
  python -m focus_detr.demo --config-file configs/focus_detr_demo_shapes.py \\
      --weights OUT/model_final.pth --val-images 4 --output OUT/pictures train.output_dir=OUT
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m focus_detr.demo",
        description=(
            "Draw Focus-DETR detections (<name>_predictions.png) and the encoder's token\n"
            "selection (<name>_tokens.png: per-level foreground probabilities and the tokens\n"
            "kept by every encoder layer) for image files, folders or the config's test images."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig file")
    parser.add_argument("--weights", required=True, metavar="FILE", help="model checkpoint")
    parser.add_argument(
        "--input", nargs="+", default=[], metavar="PATH", help="image files or folders of images"
    )
    parser.add_argument(
        "--val-images",
        type=int,
        default=0,
        metavar="N",
        help="also draw the first N images of the config's test dataset",
    )
    parser.add_argument(
        "--output",
        default=None,
        metavar="DIR",
        help="output folder (default: <train.output_dir>/pictures)",
    )
    parser.add_argument(
        "--score-threshold", type=float, default=0.3, metavar="S", help="default: 0.3"
    )
    parser.add_argument(
        "--device",
        default=None,
        help="torch device (default: train.device of the config, else cuda when available)",
    )
    parser.add_argument(
        "opts",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, e.g. train.output_dir=OUT (after '--' when they follow --input)",
    )
    return parser


def _default_device(cfg) -> str:
    device = cfg.get("train", {}).get("device", None)
    if device:
        return str(device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    try:
        if args.val_images < 0:
            raise DemoInputError(f"--val-images must be >= 0, got {args.val_images}")
        if not args.input and args.val_images == 0:
            raise DemoInputError("nothing to draw: give --input PATH ... and/or --val-images N")
        if not os.path.isfile(args.weights):  # before any slow work
            raise FileNotFoundError(f"weights file not found: {args.weights}")
        cfg = load_config(args.config_file, args.opts)
        image_files = find_images(args.input)
        test_names = cfg.dataloader.test.dataset.names if "dataloader" in cfg else None
        if args.val_images > 0:
            if test_names is None:
                raise DemoInputError(f"{args.config_file} has no dataloader.test.dataset.names")
            image_files += dataset_images(test_names, args.val_images)
        output_dir = args.output
        if output_dir is None:
            train_output = cfg.get("train", {}).get("output_dir", None)
            if not train_output:
                raise DemoInputError(f"give --output: {args.config_file} has no train.output_dir")
            output_dir = os.path.join(train_output, "pictures")
        device = args.device or _default_device(cfg)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise DemoInputError(f"device {device!r} asked for, but CUDA is not available")
        predictor = FocusDETRPredictor(cfg, weights=args.weights, device=device)
        run_demo(
            predictor,
            image_files,
            output_dir=output_dir,
            metadata=dataset_metadata(test_names),
            score_threshold=args.score_threshold,
        )
    except (DemoInputError, FileNotFoundError, ConfigOverrideError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
