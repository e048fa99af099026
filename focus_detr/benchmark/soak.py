"""
Memory soak of training: many steps of a config's model and optimizer on batches of random image
sizes (tiny and thin ones such as 1x1, 16x16, 8xL and Lx8 included), empty images and crowded
images, given to the model as drawn (no resizing). Every K steps it prints the process's resident
memory (RSS) and its peak since the previous report; the verdict is on the slope of the RSS after
warm-up. The allocator is the process's: preload jemalloc (``LD_PRELOAD``) to soak it.
"""

import itertools
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import instantiate
from detectron2.engine import HookBase
from detectron2.structures import Boxes, Instances

from focus_detr.engine import BoundedHistoryHook, DETRTrainer

from .memory import peak_memory_mb, release_free_memory, reset_peak_memory, resident_memory_mb
from .steps import PRECISIONS, build_model_on_device

__all__ = ["extreme_sizes", "random_batches", "run_soak", "verdict"]


def extreme_sizes(max_side: int) -> List[Tuple[int, int]]:
    """The (height, width) of the tiny and thin images every soak draws."""
    return [(1, 1), (16, 16), (8, max_side), (max_side, 8), (1, max_side), (max_side, 1)]


def random_batches(
    *, batch_size: int, max_side: int, num_classes: int, crowd: int, seed: int
) -> Iterator[List[Dict]]:
    """
    Endless training batches in the format of detectron2's ``DatasetMapper``: per image, with
    probability 0.3 one of :func:`extreme_sizes`, else height and width uniform in
    ``[1, max_side]``; 20% without objects, 10% crowded with ``crowd`` boxes, the others with
    1..8 boxes (XYXY inside the image, at least 1 pixel wide and high).
    """
    rng = np.random.default_rng(seed)
    extremes = extreme_sizes(max_side)
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
    """Every ``every`` steps: RSS (after returning free pages with ``release``) and the peak
    since the previous report."""

    def __init__(self, every: int, *, release: bool):
        self.every, self.release = every, release
        self.samples: List[Tuple[int, float]] = []
        self.peaks: List[Tuple[int, float]] = []
        self.start = time.perf_counter()
        self.peak_label = "peak since last" if reset_peak_memory() else "peak since start"

    def after_step(self) -> None:
        iteration = self.trainer.iter + 1
        if iteration % self.every:
            return
        peak = peak_memory_mb()
        if self.release:
            release_free_memory()
        rss = resident_memory_mb()
        reset_peak_memory()
        self.samples.append((iteration, rss))
        if peak is not None:
            self.peaks.append((iteration, peak))
        peak_text = "n/a" if peak is None else f"{peak:9.1f} MiB"
        print(
            f"[soak] iteration {iteration:6d}  RSS {rss:9.1f} MiB  ({self.peak_label} "
            f"{peak_text}, {time.perf_counter() - self.start:7.1f} s)"
        )
        sys.stdout.flush()


def run_soak(
    cfg,
    *,
    iterations: int,
    report_every: int,
    warmup: Optional[int] = None,
    batch_size: int = 2,
    max_side: int = 400,
    crowd: int = 150,
    max_slope: float = 5.0,
    seed: int = 0,
    repeat: int = 0,
    precision: str = "fp32",
    release: bool = False,
) -> bool:
    """
    Train ``iterations`` steps on :func:`random_batches` (``repeat`` > 0: cycle through that
    many fixed batches), print the memory every ``report_every`` steps and the verdict; returns
    whether the memory stayed flat after ``warmup`` steps (default a quarter). A failing step
    is re-raised after printing the batch it failed on.
    """
    warmup = iterations // 4 if warmup is None else warmup
    released = release_free_memory() if release else None
    if release and released is None:
        raise ValueError("release: neither jemalloc nor glibc's malloc_trim is available here")
    model = build_model_on_device(cfg, seed=seed).train()
    cfg.optimizer.params.model = model
    batches = random_batches(
        batch_size=batch_size,
        max_side=max_side,
        num_classes=int(cfg.model.num_classes),
        crowd=crowd,
        seed=seed,
    )
    if repeat > 0:
        batches = itertools.cycle(list(itertools.islice(batches, repeat)))
    last: List[List[Dict]] = []
    trainer = DETRTrainer(
        model,
        _remember_last(batches, last),
        instantiate(cfg.optimizer),
        clip_grad_max_norm=cfg.train.clip_grad.max_norm if cfg.train.clip_grad.enabled else None,
        amp=PRECISIONS[precision] is not None,
        amp_dtype=PRECISIONS[precision],
    )
    report = _MemoryReport(report_every, release=release)
    trainer.register_hooks([BoundedHistoryHook(), report])  # as in training
    print(
        f"[soak] {iterations} iterations of {batch_size} images (sizes 1..{max_side}, extremes "
        f"{extreme_sizes(max_side)}, empty and crowded with {crowd} boxes"
        f"{f', {repeat} batches repeated' if repeat else ''}), {precision}; RSS every "
        f"{report_every}{f' after {released}' if released else ''}, warm-up {warmup}"
    )
    print(f"[soak] RSS before training {resident_memory_mb():.1f} MiB")
    try:
        trainer.train(0, iterations)
    except Exception:
        described = [(d["height"], d["width"], len(d["instances"])) for d in last[0]]
        print(
            f"[soak] FAILED at iteration {trainer.iter} on a batch of (height, width, boxes) "
            f"{described}"
        )
        raise
    stable, summary = verdict(report.samples, warmup=warmup, max_slope=max_slope)
    peaks = [mb for i, mb in report.peaks if i >= warmup]
    if peaks:
        half = len(peaks) // 2
        print(
            f"[soak] peaks after warm-up (not judged): {min(peaks):.1f} to {max(peaks):.1f} MiB, "
            f"first half max {max(peaks[:half] or peaks):.1f}, second half max "
            f"{max(peaks[half:]):.1f}"
        )
    print(f"[soak] verdict: {summary}")
    return stable
