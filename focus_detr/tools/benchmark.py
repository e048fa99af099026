"""Time a config's training step or inference, the deformable-attention op, or soak memory.

    python -m focus_detr.tools.benchmark train --config-file CFG [--precision fp32 bf16]
        [--iters 5] [--warmup 2] [--with-loader] [--threads T] [--profile] [--output FILE.md]
        [KEY=VALUE ...]
    python -m focus_detr.tools.benchmark inference --config-file CFG (--size H W | --val-image)
        [--weights W.pth] [--compile [BACKEND]] [same options]
    python -m focus_detr.tools.benchmark msda [--device cpu|cuda] [--iters 5] [--warmup 1]
    python -m focus_detr.tools.benchmark soak [--config-file CFG] [--iters 2000]
        [--report-every 50] [--warmup N] [--max-side 400] [--repeat N] [--release] [KEY=VALUE ...]

train: DETRTrainer.run_step in every --precision side by side (same batches and initial
weights; the ratio column compares each with the first), split by module and training phase.
inference: eval, no_grad, batch 1; --compile adds torch.compile(model) beside each eager run.
msda: the op on the encoder problem of an 800x1333 image,
compiled kernel against the grid_sample reference (and torch-ms-deform-attn when installed).
soak: memory of many training steps on random sizes, empty and crowded images; exit status 1
when the resident memory grows more than --max-slope MiB per 1000 steps after warm-up. Every
report starts with the machine (CPU model and flags, ISA limits, torch, threads, allocator).
``KEY=VALUE`` are config overrides; the device is the config's ``train.device``.
"""

import argparse
import sys
from typing import List, Optional

import torch
from detectron2.config import LazyConfig

import focus_detr.data  # noqa: F401  (registers the synthetic shapes datasets)
from focus_detr.benchmark import describe_machine, format_runs
from focus_detr.benchmark.msda import time_msda
from focus_detr.benchmark.soak import run_soak
from focus_detr.benchmark.steps import PRECISIONS, time_inference, time_training
from focus_detr.engine import apply_overrides

DEMO_CONFIG = "configs/focus_detr_demo_shapes.py"


def _at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _common(parser, *, iters: int, warmup: int) -> None:
    parser.add_argument("--iters", type=_at_least(1), default=iters, help=f"default {iters}")
    parser.add_argument(
        "--warmup", type=_at_least(0), default=warmup, help=f"untimed first (default {warmup})"
    )
    parser.add_argument("--threads", type=_at_least(1), help="torch intra-op threads")


def _model_mode(parser) -> None:
    parser.add_argument("--config-file", required=True, metavar="FILE")
    _common(parser, iters=5, warmup=2)
    parser.add_argument(
        "--precision", nargs="+", choices=list(PRECISIONS), default=["fp32", "bf16"]
    )
    parser.add_argument("--profile", action="store_true", help="torch.profiler table per run")
    parser.add_argument("--output", metavar="FILE.md", help="also write the report there")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m focus_detr.tools.benchmark",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    train = modes.add_parser("train", help="training step per precision and module")
    _model_mode(train)
    train.add_argument("--with-loader", action="store_true", help="time with the live loader")
    inference = modes.add_parser("inference", help="inference per precision and module")
    _model_mode(inference)
    source = inference.add_mutually_exclusive_group(required=True)
    source.add_argument("--size", type=_at_least(1), nargs=2, metavar=("H", "W"))
    source.add_argument("--val-image", action="store_true", help="first test-loader image")
    inference.add_argument("--weights", help="checkpoint to load (default: random weights)")
    inference.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        metavar="BACKEND",
        help="also time torch.compile(model) after each eager run (backend: inductor, or e.g. "
        "aot_eager); the compiling first call is reported separately",
    )
    msda = modes.add_parser("msda", help="the deformable-attention op")
    _common(msda, iters=5, warmup=1)
    msda.add_argument("--device", default="cpu", help="cpu or cuda[:index] (default cpu)")
    msda.add_argument("--profile", action="store_true", help="torch.profiler table per op")
    soak = modes.add_parser("soak", help="resident memory over many training steps")
    soak.add_argument("--config-file", default=DEMO_CONFIG, metavar="FILE")
    soak.add_argument("--iters", type=_at_least(1), default=2000)
    soak.add_argument("--report-every", type=_at_least(1), default=50, metavar="K")
    soak.add_argument("--warmup", type=_at_least(0), help="steps the verdict ignores (25%%)")
    soak.add_argument("--threads", type=_at_least(1), help="torch intra-op threads")
    soak.add_argument("--batch-size", type=_at_least(1), default=2)
    soak.add_argument("--max-side", type=_at_least(1), default=400, help="largest height/width")
    soak.add_argument("--crowd", type=_at_least(1), default=150, help="boxes of a crowded image")
    soak.add_argument("--max-slope", type=float, default=5.0, help="MiB per 1000 steps")
    soak.add_argument("--seed", type=int, default=0)
    soak.add_argument("--repeat", type=_at_least(0), default=0, metavar="N", help="N batches")
    soak.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    soak.add_argument(
        "--release",
        action="store_true",
        help="return the allocator's free pages before each reading (jemalloc or malloc_trim): "
        "RSS then shows live memory and fragmentation",
    )
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    # config overrides (KEY=VALUE) anywhere, also right after a list option's values
    overrides = [arg for arg in argv if "=" in arg and not arg.startswith("-")]
    args = build_parser().parse_args([arg for arg in argv if arg not in overrides])
    args.opts = overrides
    if args.mode == "msda" and overrides:
        build_parser().error(f"msda takes no config overrides, got {overrides}")
    return args


def _print_report(report: str, profiles, output: Optional[str]) -> None:
    for label, table in profiles:
        report += f"\n## torch.profiler, {label}: one run, top ops by self CPU time\n\n{table}\n"
    print(report, end="")
    if output:
        with open(output, "w") as f:
            f.write(report)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.mode == "msda":
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print(f"error: --device {args.device}: CUDA is not available", file=sys.stderr)
            return 2
        result = time_msda(device, warmup=args.warmup, iters=args.iters, profile=args.profile)
        lines = ["# Multi-scale deformable attention benchmark", ""]
        lines += [f"- {k}: {v}" for k, v in {**describe_machine(device), **result["notes"]}.items()]
        _print_report("\n".join(lines + [""] + result["lines"]) + "\n", result["profiles"], None)
        return 0
    cfg = apply_overrides(LazyConfig.load(args.config_file), args.opts)
    if args.mode == "soak":
        options = ("report_every", "warmup", "batch_size", "max_side", "crowd", "max_slope")
        options += ("seed", "repeat", "precision", "release")
        print(f"[soak] {args.config_file} {' '.join(args.opts)}".rstrip())
        print("[soak] " + ", ".join(f"{k} {v}" for k, v in describe_machine().items()))
        kwargs = {name: getattr(args, name) for name in options}
        return 0 if run_soak(cfg, iterations=args.iters, **kwargs) else 1
    timing = dict(precisions=list(dict.fromkeys(args.precision)), warmup=args.warmup)
    timing.update(iters=args.iters, profile=args.profile)
    if args.mode == "train":
        runs, notes, profiles = time_training(cfg, with_loader=args.with_loader, **timing)
    else:
        size = tuple(args.size) if args.size else None
        runs, notes, profiles = time_inference(
            cfg, size=size, weights=args.weights, compile_backend=args.compile, **timing
        )
    notes = {"config": " ".join([args.config_file] + args.opts), **notes}
    kind = "Training-step" if args.mode == "train" else "Inference"
    device = torch.device(notes["device"])
    title = f"{kind} benchmark of {args.config_file}"
    _print_report(format_runs(title, describe_machine(device), notes, runs), profiles, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
