"""
Memory soak test of training (not part of CI): many iterations of a config's model, optimizer
and training step on batches of random image sizes (tiny and thin ones such as 1x1, 16x16,
8xL and Lx8 included), empty images and crowded images, with the allocator policy of
``train_net.py`` (``AllocatorPurgeHook``: under jemalloc, free pages returned every
``--purge-period`` iterations). Every K iterations (a multiple of the purge period) it prints the
process's resident memory (RSS) right after the loop's own purge, which is when a run's memory
is comparable from one report to the next, and its peak since the previous report (``VmHWM``,
reset after each report). The verdict is on the slope of the former after warm-up. The peak is
that memory plus the largest batches of the window, so it varies with which batches a window
holds (+-100 MiB here); it is summarised, not judged. Under the system's malloc nothing is
returned during training and RSS is read as it is.

    python -m focus_detr.tools.soak --iterations 2000 --report-every 50
    python -m focus_detr.tools.soak --config-file CFG --iterations 500 train.amp.enabled=False

Like ``train_net.py``, it first restarts itself with jemalloc preloaded where jemalloc is installed
(``focus_detr.allocator``); ``FOCUS_DETR_ALLOCATOR=system`` measures the system's malloc instead.
Exit status 0 when the memory stays flat after warm-up (slope at most ``--max-slope`` MB per
1000 iterations), 1 when it grows. The images go to the model as drawn (no resizing), so the
sizes above really reach the backbone, the encoder and the losses.
"""

import argparse
import ctypes
import ctypes.util
import itertools
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from focus_detr.allocator import (
    describe_allocator,
    jemalloc_purge,
    reexec_with_preferred_allocator,
)

if __name__ == "__main__":
    # an allocator is chosen when a process starts: restart before torch loads
    reexec_with_preferred_allocator()

import numpy as np
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import HookBase
from detectron2.structures import Boxes, Instances
from omegaconf import OmegaConf

from focus_detr.engine import DETRTrainer, build_model
from focus_detr.engine.hooks import DEFAULT_PURGE_PERIOD, AllocatorPurgeHook, BoundedHistoryHook
from focus_detr.engine.precision import amp_from_config
from focus_detr.tools.process_memory import peak_memory_mb, reset_peak_memory, resident_memory_mb

__all__ = ["main", "random_batches", "release_free_memory", "verdict"]

DEFAULT_CONFIG = "configs/focus_detr_demo_shapes.py"


def release_free_memory() -> Optional[str]:
    """
    Have the allocator return its free pages to the operating system, so that RSS shows what is
    allocated (live data and fragmentation) rather than what the allocator keeps for reuse.
    Returns how (``"jemalloc purge"``, ``"malloc_trim"``), or None where neither is available.
    """
    if jemalloc_purge():
        return "jemalloc purge"
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        return None
    return "malloc_trim"


def _sizes(max_side: int) -> List[Tuple[int, int]]:
    return [(1, 1), (16, 16), (8, max_side), (max_side, 8), (1, max_side), (max_side, 1)]


def random_batches(
    *, batch_size: int, max_side: int, num_classes: int, crowd: int, seed: int
) -> Iterator[List[Dict]]:
    """
    Endless training batches in the format of detectron2's ``DatasetMapper``: per image, with
    probability 0.3 one of the extreme sizes of ``_sizes(max_side)``, else height and width
    uniform in ``[1, max_side]``; 20% without objects, 10% crowded with ``crowd`` boxes, the
    others with 1..8 boxes (XYXY inside the image, at least 1 pixel wide and high).
    """
    rng = np.random.default_rng(seed)
    extremes = _sizes(max_side)
    while True:
        batch = []
        for _ in range(batch_size):
            if rng.random() < 0.3:
                height, width = extremes[rng.integers(len(extremes))]
            else:
                height, width = (int(v) for v in rng.integers(1, max_side + 1, size=2))
            kind = rng.random()
            count = 0 if kind < 0.2 else crowd if kind < 0.3 else int(rng.integers(1, 9))
            x0 = rng.uniform(0, max(width - 1, 0), count)
            y0 = rng.uniform(0, max(height - 1, 0), count)
            x1 = np.minimum(x0 + 1 + rng.uniform(0, width, count), width)
            y1 = np.minimum(y0 + 1 + rng.uniform(0, height, count), height)
            instances = Instances((height, width))
            boxes = np.stack([x0, y0, x1, y1], axis=1) if count else np.zeros((0, 4))
            instances.gt_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32))
            instances.gt_classes = torch.as_tensor(rng.integers(0, num_classes, count))
            image = torch.as_tensor(rng.integers(0, 256, (3, height, width), dtype=np.uint8))
            batch.append({"image": image, "instances": instances, "height": height, "width": width})
        yield batch


def verdict(
    samples: Sequence[Tuple[int, float]], *, warmup: int, max_slope: float
) -> Tuple[bool, str]:
    """
    Whether the RSS ``samples`` ``(iteration, MiB)`` after iteration ``warmup`` stay flat: the
    least-squares slope is at most ``max_slope`` MiB per 1000 iterations. Returns the decision
    and a one-line summary.
    """
    after = [(i, mb) for i, mb in samples if i >= warmup]
    if len(after) < 3:
        return False, f"no verdict: {len(after)} samples after warm-up (need 3)"
    iterations = np.array([i for i, _ in after], dtype=np.float64)
    memory = np.array([mb for _, mb in after], dtype=np.float64)
    slope = float(np.polyfit(iterations, memory, 1)[0]) * 1000.0
    stable = slope <= max_slope
    summary = (
        f"{'STABLE' if stable else 'GROWING'}: RSS {memory[0]:.1f} -> {memory[-1]:.1f} MiB "
        f"(min {memory.min():.1f}, max {memory.max():.1f}) from iteration "
        f"{int(iterations[0])} to {int(iterations[-1])}; slope {slope:+.2f} MiB per 1000 "
        f"iterations (limit {max_slope:g})"
    )
    return stable, summary


def _remember_last(batches: Iterator[List[Dict]], last: List[List[Dict]]):
    for batch in batches:
        last[:] = [batch]
        yield batch


class _MemoryReport(HookBase):
    def __init__(self, every: int, samples: List[Tuple[int, float]], *, release: bool):
        self.every = every
        self.samples = samples
        self.peaks: List[Tuple[int, float]] = []
        self.release = release
        self.start = time.perf_counter()
        self.peak_label = "peak since last" if reset_peak_memory() else "peak since start"

    def after_step(self) -> None:
        iteration = self.trainer.iter + 1
        if iteration % self.every == 0:
            peak = peak_memory_mb()
            if self.release:
                release_free_memory()
            rss = resident_memory_mb()
            reset_peak_memory()
            self.samples.append((iteration, rss))
            if peak is not None:
                self.peaks.append((iteration, peak))
            elapsed = time.perf_counter() - self.start
            peak_text = "n/a" if peak is None else f"{peak:9.1f} MiB"
            print(
                f"[soak] iteration {iteration:6d}  RSS {rss:9.1f} MiB  "
                f"({self.peak_label} {peak_text}, {elapsed:7.1f} s)"
            )
            sys.stdout.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m focus_detr.tools.soak", description=__doc__.strip().splitlines()[0]
    )
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--report-every", type=int, default=50, metavar="K")
    parser.add_argument(
        "--warmup", type=int, default=None, help="iterations ignored by the verdict (25%%)"
    )
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-side", type=int, default=400, help="largest height/width")
    parser.add_argument("--crowd", type=int, default=150, help="boxes of a crowded image")
    parser.add_argument("--max-slope", type=float, default=5.0, help="MiB per 1000 iterations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeat",
        type=int,
        default=0,
        metavar="N",
        help="cycle through N fixed batches (memory then has no new shapes to adapt to)",
    )
    parser.add_argument(
        "--purge-period",
        type=int,
        default=DEFAULT_PURGE_PERIOD,
        help="iterations between the allocator purges of training (default: train_net.py's)",
    )
    parser.add_argument(
        "--release",
        action="store_true",
        help="diagnosis: have the allocator (jemalloc, or glibc's malloc_trim) return its free "
        "pages before each measurement, so that RSS shows live memory and fragmentation",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value")
    return parser


def main(argv: Sequence[str] = None) -> int:
    args = _parser().parse_args(argv)
    for name in ("iterations", "report_every", "batch_size", "max_side", "purge_period"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.report_every % args.purge_period:
        raise SystemExit(
            f"--report-every ({args.report_every}) must be a multiple of --purge-period "
            f"({args.purge_period}): memory is read right after a purge"
        )
    warmup = args.iterations // 4 if args.warmup is None else args.warmup
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    torch.manual_seed(args.seed)
    model = build_model(cfg).train()
    cfg.optimizer.params.model = model
    clip = OmegaConf.select(cfg, "train.clip_grad.enabled", default=True)
    batches = random_batches(
        batch_size=args.batch_size,
        max_side=args.max_side,
        num_classes=int(cfg.model.num_classes),
        crowd=args.crowd,
        seed=args.seed,
    )
    if args.repeat > 0:
        batches = itertools.cycle(list(itertools.islice(batches, args.repeat)))
    last_batch: List[List[Dict]] = []
    batches = _remember_last(batches, last_batch)
    amp = amp_from_config(cfg, next(model.parameters()).device)
    trainer = DETRTrainer(
        model,
        batches,
        instantiate(cfg.optimizer),
        clip_grad_max_norm=(
            OmegaConf.select(cfg, "train.clip_grad.max_norm", default=0.1) if clip else None
        ),
        amp=amp.enabled,
        amp_dtype=amp.dtype,
        max_consecutive_nonfinite=OmegaConf.select(
            cfg, "train.skip_nonfinite.max_consecutive", default=0
        ),
    )
    samples: List[Tuple[int, float]] = []
    release = release_free_memory() if args.release else None
    if args.release and release is None:
        raise SystemExit("--release: neither jemalloc nor glibc's malloc_trim is available here")
    report = _MemoryReport(args.report_every, samples, release=args.release)
    trainer.register_hooks(
        [
            BoundedHistoryHook(),  # as train_net.py's training loop
            AllocatorPurgeHook(period=args.purge_period),  # as train_net.py's training loop
            # after the purge: memory is read right after the loop returned its free pages
            report,
        ]
    )
    print(
        f"[soak] {args.config_file}: {args.iterations} iterations of {args.batch_size} images "
        f"(sizes 1..{args.max_side}, extremes {_sizes(args.max_side)}, empty and crowded "
        f"with {args.crowd} boxes{f', {args.repeat} batches repeated' if args.repeat else ''}); "
        f"RSS every {args.report_every}{f' after {release}' if release else ''}, "
        f"warm-up {warmup}"
    )
    print(f"[soak] {describe_allocator()}")
    print(f"[soak] RSS before training {resident_memory_mb():.1f} MiB")
    try:
        trainer.train(0, args.iterations)
    except Exception:
        described = [(d["height"], d["width"], len(d["instances"])) for d in last_batch[0]]
        print(
            f"[soak] FAILED at iteration {trainer.iter} on a batch of (height, width, boxes) "
            f"{described}"
        )
        raise
    stable, summary = verdict(samples, warmup=warmup, max_slope=args.max_slope)
    peaks = [mb for i, mb in report.peaks if i >= warmup]
    if peaks:
        print(
            f"[soak] peaks after warm-up (not judged): {min(peaks):.1f} to {max(peaks):.1f} MiB, "
            f"first half max {max(peaks[: len(peaks) // 2] or peaks):.1f}, "
            f"second half max {max(peaks[len(peaks) // 2 :]):.1f}"
        )
    print(f"[soak] verdict: {summary}")
    return 0 if stable else 1


if __name__ == "__main__":
    sys.exit(main())
