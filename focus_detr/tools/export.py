"""
Export a focus-detr model for deployment, as ONNX or as a ``torch.export`` program.

    python -m focus_detr.tools.export --config-file CFG [--weights W.pth] \\
        --format {onnx,torch-export} --output PATH --height H --width W [--overwrite] \\
        [KEY=VALUE ...]

The exported program takes ``image``, a (3, H, W) float32 tensor in the config's input format
(``model.input_format``) with values 0-255, of exactly the exported H x W, and returns
``boxes`` (K, 4) absolute XYXY in that image, ``scores`` (K,) and ``classes`` (K,) int64, with
K = ``model.num_select``. Without ``--weights`` the config's initial weights (seeded) are
exported. After exporting, the program is run on a random image and compared with PyTorch's
``model.inference`` (skipped with ``--no-verify``, or for ONNX when onnxruntime is missing).
"""

import argparse
import logging
import os
import sys
import time
from typing import List, Optional

import torch
from detectron2.config import instantiate

from ..demo.predictor import load_config
from ..engine.checkpoint import CheckpointError, SafeCheckpointer
from ..engine.overrides import ConfigOverrideError
from ..export import (
    DetectorExportWrapper,
    compare_detections,
    count_msda_nodes,
    export_onnx,
    export_torch,
    run_onnx,
    run_torch_export,
)
from ..utils.output_files import OutputPathError, check_output_file

__all__ = ["ExportError", "build_parser", "main"]

FORMATS = ("onnx", "torch-export")
BOX_TOLERANCE = 0.05  # pixels
SCORE_TOLERANCE = 1e-4


class ExportError(Exception):
    """Bad command-line input or a failed verification, reported without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m focus_detr.tools.export",
        description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig file")
    parser.add_argument(
        "--weights",
        default=None,
        metavar="FILE",
        help="checkpoint as train_net.py writes it, or a converted detrex one (default: the "
        "config's initial weights, seeded with --seed)",
    )
    parser.add_argument("--format", required=True, choices=FORMATS, help="output format")
    parser.add_argument("--output", required=True, metavar="PATH", help="file to write")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --output when it exists (never done without this flag)",
    )
    parser.add_argument("--height", required=True, type=int, help="input image height")
    parser.add_argument("--width", required=True, type=int, help="input image width")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the initial weights and of the test image"
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="do not compare the export with PyTorch"
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config overrides, e.g. model.num_select=50"
    )
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    """Cheap checks before any slow work, with the offending value in the message."""
    if not os.path.isfile(args.config_file):
        raise ExportError(f"config file not found: {args.config_file}")
    if args.weights is not None and not os.path.isfile(args.weights):
        raise ExportError(f"weights file not found: {args.weights}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value <= 0:
            raise ExportError(f"--{name} must be positive, got {value}")
    directory = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(directory):
        raise ExportError(f"the folder of --output {args.output} does not exist: {directory}")
    try:
        check_output_file(
            args.output, inputs=(args.weights, args.config_file), overwrite=args.overwrite
        )
    except OutputPathError as error:
        raise ExportError(str(error)) from error


class _RecordingCheckpointer(SafeCheckpointer):
    """Keeps what the load left out (detectron2 only logs it)."""

    incompatible = None

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def _load_weights(model: torch.nn.Module, path: str) -> None:
    """All of the model's weights from ``path``, else an error naming what does not fit."""
    checkpointer = _RecordingCheckpointer(model)
    try:
        checkpointer.load(path)
    except CheckpointError as error:
        raise ExportError(str(error)) from error
    incompatible = checkpointer.incompatible
    if incompatible is None:
        return
    left_out = sorted(
        set(incompatible.missing_keys) | {key for key, *_ in incompatible.incorrect_shapes}
    )
    if left_out:
        more = f" and {len(left_out) - 5} more" if len(left_out) > 5 else ""
        raise ExportError(
            f"{path} has no weights of the right shape for {len(left_out)} tensors of the model "
            f"built from the config, e.g. {left_out[:5]}{more}: is it a checkpoint of this "
            "config (with the same overrides)?"
        )


def _build_model(cfg, weights: Optional[str], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = instantiate(cfg.model)
    model.to("cpu").eval()
    if weights is None:
        print(f"no --weights: exporting the config's initial weights (seed {seed})")
    else:
        _load_weights(model, weights)
    return model


def _verify(model, wrapper, image: torch.Tensor, args: argparse.Namespace) -> None:
    if args.format == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            print("onnxruntime is not installed: the ONNX model was not run")
            return
        outputs = run_onnx(args.output, image)
    else:
        outputs = run_torch_export(args.output, image)
    with torch.no_grad():
        reference = model.inference([{"image": image}])[0]["instances"]
    comparison = compare_detections(
        reference.pred_boxes.tensor.numpy(),
        reference.scores.numpy(),
        reference.pred_classes.numpy(),
        *outputs,
        score_tolerance=SCORE_TOLERANCE,
    )
    print(f"{args.format} vs PyTorch on a random image: {comparison}")
    if not comparison.within(BOX_TOLERANCE, SCORE_TOLERANCE):
        raise ExportError(
            f"the exported detections differ from PyTorch's (tolerances {BOX_TOLERANCE} px, "
            f"score {SCORE_TOLERANCE}): {comparison}; {args.output} is kept for inspection"
        )


def run(args: argparse.Namespace) -> None:
    """Export as ``args`` say; raises :class:`ExportError` on bad input or failed checks."""
    _check_arguments(args)
    if args.format == "onnx":
        try:
            import onnxscript  # noqa: F401
        except ImportError as error:
            raise ExportError(
                f"--format onnx needs onnx and onnxscript (pip install onnx onnxscript): {error}"
            )
    try:
        cfg = load_config(args.config_file, args.opts)
    except ConfigOverrideError as error:
        raise ExportError(str(error)) from error
    model = _build_model(cfg, args.weights, args.seed)
    wrapper = DetectorExportWrapper(model, height=args.height, width=args.width)
    generator = torch.Generator().manual_seed(args.seed)
    image = torch.rand(3, args.height, args.width, generator=generator) * 255
    with torch.no_grad():
        num_detections = wrapper(image)[0].shape[0]  # min(num_select, queries x classes)

    start = time.perf_counter()
    if args.format == "onnx":
        export_onnx(wrapper, image, args.output)
        attention = "standard ONNX operators around GridSample (opset 18)"
    else:
        program = export_torch(wrapper, image, args.output)
        attention = f"{count_msda_nodes(program)} focus_detr::ms_deform_attn nodes"
    seconds = time.perf_counter() - start
    size_mb = os.path.getsize(args.output) / 2**20
    print(f"wrote {args.output} ({size_mb:.1f} MiB) in {seconds:.1f} s")
    print(
        f"input: image (3, {args.height}, {args.width}) float32, {model.input_format}, 0-255, "
        f"fixed size; outputs: boxes ({num_detections}, 4) XYXY, scores ({num_detections},), "
        f"classes ({num_detections},) int64"
    )
    if (wrapper.padded_height, wrapper.padded_width) != (args.height, args.width):
        print(
            f"the model pads the image to {wrapper.padded_height}x{wrapper.padded_width} "
            "inside the program"
        )
    print(f"deformable attention: {attention}")
    if not args.no_verify:
        _verify(model, wrapper, image, args)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        run(args)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
