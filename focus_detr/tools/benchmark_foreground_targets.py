"""
Time of the foreground targets of a crowded batch at full resolution.

    python -m focus_detr.tools.benchmark_foreground_targets [--boxes 500] [--batch 2]

An 800 x 1333 input (4 levels, strides 8-64, 22223 tokens) with ``--boxes`` random boxes per
image: a dense (N, M, 4) distance tensor would hold 178 MB per image at M = 500; the chunked
computation keeps every temporary under ``max_elements`` values. Prints the median time of
``--repeats`` runs and the machine.
"""

import argparse
import statistics
import time

import torch

from focus_detr.modeling.encoders.foreground_targets import compute_foreground_targets
from focus_detr.tools.machine import describe_machine

LEVEL_SHAPES = [(100, 167), (50, 84), (25, 42), (13, 21)]
STRIDES = (8, 16, 32, 64)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--boxes", type=int, default=500, help="boxes per image")
    parser.add_argument("--batch", type=int, default=2, help="images")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-elements", type=int, default=1 << 22)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    boxes = []
    for _ in range(args.batch):
        corner = torch.rand(args.boxes, 2) * torch.tensor([1200.0, 700.0])
        boxes.append(torch.cat([corner, corner + torch.rand(args.boxes, 2) * 300 + 2], dim=1))
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        targets = compute_foreground_targets(
            boxes, LEVEL_SHAPES, STRIDES, max_elements=args.max_elements
        )
        times.append(time.perf_counter() - start)
    for key, value in describe_machine().items():
        print(f"{key}: {value}")
    print(
        f"foreground targets: {args.batch} images x {args.boxes} boxes, 800x1333 input, "
        f"{targets.shape[1]} tokens, max_elements={args.max_elements}: "
        f"median {statistics.median(times) * 1000:.1f} ms over {args.repeats} runs, "
        f"{int(targets.sum())} positive tokens"
    )


if __name__ == "__main__":
    main()
