"""Compare DETR encoders on one decoder: parameters, GFLOPs, latency, memory, tokens, keep ratio.

    python -m focus_detr.tools.analyze --config-file A.py [B.py ...] [--weights WA WB ...]
        [--names a b ...] [--size H W | --dataset NAME] [--num-images N] [--eval-images N]
        [--threads T]
        [--device cpu cuda] [--warmup W] [--iters I] [--baseline NAME]
        [--sweep-keep-ratio R1 R2 ...] [--no-memory] [--output DIR] [KEY=VALUE ...]

For every config: parameters and GFLOPs per part (backbone, neck, encoder, query selection,
decoder, other; fvcore with the deformable-attention op), median inference latency of the
whole model and of the encoder (hooks on ``model.encoder`` during the same runs) per device,
peak memory, tokens updated per encoder layer and, on dataset images, the share of the
ground-truth foreground tokens each layer updates. ``--baseline`` adds cost ratios to one
config. ``--sweep-keep-ratio`` changes the keep ratio of Focus / Sparse DETR encoders at
inference and evaluates AP / AP50 (the config's test loader and evaluator), GFLOPs and latency
per value, with a PNG of AP against GFLOPs. Weights: one per config ("" or "none": random);
several runs of a config (e.g. training seeds) as a comma-separated list: the first is analyzed
and every run is evaluated for AP / AP50 (mean, standard deviation and range per config).
``KEY=VALUE`` overrides apply to every config. Prints markdown; ``--output DIR`` writes
analysis.md, analysis.json (and keep_ratio_sweep.png).
"""

import argparse
import logging
import math
import os
import sys
from typing import List, Optional

import torch

import focus_detr.data  # noqa: F401  (registers the synthetic shapes datasets)
from focus_detr.analysis.measure import CPU_MEMORY_METHOD, CUDA_MEMORY_METHOD
from focus_detr.analysis.models import AnalysisError, load_analyzed_configs, resolve_name
from focus_detr.analysis.plot import plot_sweep
from focus_detr.analysis.report import format_markdown, write_json
from focus_detr.analysis.runner import (
    AnalysisSettings,
    analyze_config,
    baseline_ratios,
    check_evaluation,
    check_sweep,
    shared_foreground_ranges,
)
from focus_detr.benchmark import describe_machine

PLOT_FILE = "keep_ratio_sweep.png"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m focus_detr.tools.analyze",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", nargs="+", required=True, metavar="FILE")
    parser.add_argument(
        "--weights",
        nargs="+",
        metavar="PATH",
        help="one per config; '' or none: random; A.pth,B.pth,...: runs of one config (seeds)",
    )
    parser.add_argument("--names", nargs="+", metavar="NAME", help="labels (default: file names)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--size", type=int, nargs=2, metavar=("H", "W"), help="random input (default 800 1333)"
    )
    source.add_argument("--dataset", metavar="NAME", help="registered dataset: first images")
    parser.add_argument(
        "--num-images",
        type=int,
        metavar="N",
        help="--dataset: images analyzed (default 1)",
    )
    parser.add_argument(
        "--eval-images",
        type=int,
        metavar="N",
        help="sweep: first N test images evaluated for AP (default all)",
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument(
        "--device",
        nargs="+",
        choices=["cpu", "cuda"],
        help="devices timed (default: cpu, and cuda when available)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes (default 2)")
    parser.add_argument("--iters", type=int, default=5, help="timed passes (default 5)")
    parser.add_argument("--baseline", metavar="NAME", help="config (name or prefix) for ratios")
    parser.add_argument(
        "--sweep-keep-ratio",
        type=float,
        nargs="+",
        metavar="R",
        help="keep ratios in (0, 1] for Focus / Sparse DETR encoders: AP, GFLOPs, latency",
    )
    parser.add_argument(
        "--foreground-ranges-of",
        metavar="NAME",
        help="token quality: use this config's foreground size ranges for every config "
        "(default: those of the first config whose encoder has them, e.g. Focus, for all)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory")
    parser.add_argument("--output", metavar="DIR", help="write analysis.md / .json (and PNG)")
    argv = sys.argv[1:] if argv is None else list(argv)
    # config overrides (KEY=VALUE) anywhere, also right after a list option's values
    overrides = [arg for arg in argv if "=" in arg and not arg.startswith("-")]
    args = parser.parse_args([arg for arg in argv if arg not in overrides])
    args.opts = overrides
    if args.size is not None and min(args.size) < 1:
        parser.error(f"--size needs positive H W, got {args.size}")
    for option in ("num_images", "eval_images"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.warmup < 0 or args.iters < 1:
        parser.error(f"need --warmup >= 0 and --iters >= 1, got {args.warmup}, {args.iters}")
    for ratio in args.sweep_keep_ratio or []:
        if not (math.isfinite(ratio) and 0.0 < ratio <= 1.0):
            parser.error(f"--sweep-keep-ratio values must be in (0, 1], got {ratio}")
    if args.sweep_keep_ratio and not args.output:
        parser.error("--sweep-keep-ratio writes a PNG plot: give --output DIR")
    if args.device and "cuda" in args.device and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    return args


def _devices(args) -> List[torch.device]:
    names = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    return [torch.device(name) for name in dict.fromkeys(names)]


def _settings_notes(args, devices) -> dict:
    notes = {
        "devices": ", ".join(str(device) for device in devices),
        "timing": (
            f"per input image {args.warmup} warm-up + {args.iters} timed inferences, batch 1, "
            "float32, eval, no_grad; median of the timed inferences; encoder: forward pre / "
            "post hooks on model.encoder during the same inferences"
        ),
        "FLOPs": (
            "detectron2 FlopCountAnalysis (fvcore) with focus_detr.layers.flop_count handles "
            "(deformable attention included), mean per image; ops counted for the module that "
            "calls them: the two-stage heads the encoder calls to score tokens count for the "
            "encoder"
        ),
        "parameters": "the two-stage heads an encoder borrows count for the query selection",
    }
    if not args.no_memory:
        notes["memory"] = " / ".join(
            [CPU_MEMORY_METHOD] * any(d.type == "cpu" for d in devices)
            + [CUDA_MEMORY_METHOD] * any(d.type == "cuda" for d in devices)
        )
    if args.opts:
        notes["overrides"] = " ".join(args.opts)
    return notes


def run(args) -> dict:
    """Analyze every config and return the report dict (JSON-ready but for non-finite floats)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    configs = load_analyzed_configs(
        args.config_file, weights=args.weights, names=args.names, overrides=args.opts
    )
    names = [config.name for config in configs]
    baseline = resolve_name(args.baseline, names) if args.baseline else None
    if args.sweep_keep_ratio:
        check_sweep(configs)
    check_evaluation([c for c in configs if c.seed_weights], "--weights with several runs")
    devices = _devices(args)
    settings = AnalysisSettings(
        size=tuple(args.size) if args.size else None,
        dataset=args.dataset,
        num_images=args.num_images,
        eval_images=args.eval_images,
        devices=devices,
        warmup=args.warmup,
        iters=args.iters,
        memory=not args.no_memory,
        sweep_keep_ratios=args.sweep_keep_ratio,
        overrides=args.opts,
        foreground_ranges=shared_foreground_ranges(configs, args.foreground_ranges_of),
    )
    results = [analyze_config(config, settings) for config in configs]
    if baseline is not None:
        base = results[names.index(baseline)]
        for result in results:
            result["ratios"] = baseline_ratios(result, base)
    report = {
        "title": "Encoder analysis: " + ", ".join(names),
        "machine": describe_machine(devices[-1] if devices[-1].type == "cuda" else None),
        "settings": _settings_notes(args, devices),
        "baseline": baseline,
        "configs": results,
        "sweep": None,
        "files": {},
    }
    if args.sweep_keep_ratio:
        report["sweep"] = [point for result in results for point in result.pop("sweep")]
        limit = f"first {args.eval_images} images" if args.eval_images else "all images"
        report["sweep_evaluation"] = (
            f"AP / AP50: each config's dataloader.test and dataloader.evaluator ({limit}); "
            f"GFLOPs and latency: the analysis inputs, on {devices[0]}"
        )
    return report


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logger = logging.getLogger("focus_detr.analysis")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[analyze] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        report = run(args)
    except AnalysisError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        report["files"] = {"markdown": "analysis.md", "json": "analysis.json"}
        if report["sweep"]:
            plot_sweep(report["sweep"], os.path.join(args.output, PLOT_FILE))
            report["files"]["plot"] = PLOT_FILE
    markdown = format_markdown(report)
    print(markdown, end="")
    if args.output:
        with open(os.path.join(args.output, "analysis.md"), "w") as f:
            f.write(markdown)
        write_json(report, os.path.join(args.output, "analysis.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
