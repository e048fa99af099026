"""Benchmark of multi-scale deformable attention on the encoder-sized problem of an 800x1333 image.

    python3 -m focus_detr.tools.benchmark_msda [--device cpu|cuda] [--repeats N] [--warmup N]
        [--threads N] [--json [PATH]]

Compares, in one run, the compiled op (``focus_detr._C``), the ``grid_sample`` reference and,
when it is installed, the registry package ``torch-ms-deform-attn``: median forward and
forward+backward times and the speed-up of the compiled op. Problem: 4 levels (100, 167),
(50, 84), (25, 42), (13, 21) = 22223 values and as many queries (the encoder), 8 heads x 32
channels, 4 points, batch 1, float32. Every query samples around its own position (offsets of a
few cells), as in the encoder.

A last row times key-aware deformable attention (Lite DETR) on the same problem: keys sampled
with ``grid_sample``, the softmax of their dot products with the queries weighting the op's
value sum.
"""

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from focus_detr.layers import (
    key_aware_deformable_attention,
    multi_scale_deformable_attention_reference,
)
from focus_detr.layers.ms_deform_attn_op import FORWARD_OP, compiled_kernel_available

LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))
NUM_HEADS, HEAD_DIM, NUM_POINTS = 8, 32, 4


def encoder_problem(device: torch.device, *, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Inputs of one encoder layer: every value token is also a query."""
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS, dtype=torch.int64)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    num_tokens, num_levels = int(sizes.sum()), len(LEVELS)
    centres = []  # normalized (x, y) centre of every token, level after level
    for height, width in LEVELS:
        ys, xs = torch.meshgrid(
            (torch.arange(height) + 0.5) / height,
            (torch.arange(width) + 0.5) / width,
            indexing="ij",
        )
        centres.append(torch.stack([xs, ys], -1).reshape(-1, 2))
    reference = torch.cat(centres)[None, :, None, None, None, :]
    level_size = shapes.flip(-1).float()[None, None, None, :, None, :]  # (w, h)
    offsets = 2.0 * torch.randn(
        1, num_tokens, NUM_HEADS, num_levels, NUM_POINTS, 2, generator=generator
    )
    logits = torch.randn(1, num_tokens, NUM_HEADS, num_levels * NUM_POINTS, generator=generator)
    tensors = {
        "value": torch.randn(1, num_tokens, NUM_HEADS, HEAD_DIM, generator=generator),
        # projected queries and keys of the key-aware attention
        "query": torch.randn(1, num_tokens, NUM_HEADS, HEAD_DIM, generator=generator),
        "key": torch.randn(1, num_tokens, NUM_HEADS, HEAD_DIM, generator=generator),
        "spatial_shapes": shapes,
        "level_start_index": starts,
        "sampling_locations": reference + offsets / level_size,
        "attention_weights": logits.softmax(-1).view(1, num_tokens, NUM_HEADS, num_levels, -1),
        "grad_output": torch.randn(1, num_tokens, NUM_HEADS * HEAD_DIM, generator=generator),
    }
    return {name: t.to(device) for name, t in tensors.items()}


def _peer() -> Optional[Callable[..., torch.Tensor]]:
    try:
        from torch_ms_deform_attn import ms_deform_attn
    except ImportError:
        return None
    return ms_deform_attn


def _key_aware(problem: Dict[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Key-aware attention with the op's signature; its weights come from the sampled keys."""
    query, key = problem["query"], problem["key"]

    def attention(value, spatial_shapes, level_start_index, sampling_locations, weights):
        del weights  # computed from the query and the sampled keys
        return key_aware_deformable_attention(
            query, key, value, spatial_shapes, level_start_index, sampling_locations
        )[0]

    return attention


def _median_ms(step: Callable[[], None], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times: List[float] = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            step()
            times.append((time.perf_counter() - begin) * 1000.0)
    return statistics.median(times)


def _timings(function, problem, device, repeats, warmup) -> Dict[str, float]:
    args = [problem[name] for name in ("value", "spatial_shapes", "level_start_index")]
    args += [problem["sampling_locations"], problem["attention_weights"]]

    def forward() -> None:
        with torch.no_grad():
            function(*args)

    leaves = [args[0], args[3], args[4]]
    grad_args = [t.detach().clone().requires_grad_(True) for t in leaves]
    train_args = [grad_args[0], args[1], args[2], grad_args[1], grad_args[2]]

    def forward_backward() -> None:
        for t in grad_args:
            t.grad = None
        function(*train_args).backward(problem["grad_output"])

    return {
        "forward_ms": _median_ms(forward, device, repeats, warmup),
        "forward_backward_ms": _median_ms(forward_backward, device, repeats, warmup),
    }


def machine_description(device: torch.device) -> Dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line)
    except (OSError, StopIteration):
        pass
    described = {
        "cpu": cpu,
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        described["gpu"] = torch.cuda.get_device_name(device)
    return described


def run(device: torch.device, repeats: int, warmup: int) -> Dict[str, object]:
    problem = encoder_problem(device)
    implementations: Dict[str, Optional[Callable[..., torch.Tensor]]] = {
        "compiled": FORWARD_OP if compiled_kernel_available(device) else None,
        "reference": multi_scale_deformable_attention_reference,
        "torch-ms-deform-attn": _peer(),
        "key-aware": _key_aware(problem),
    }
    results: Dict[str, object] = {}
    for name, function in implementations.items():
        if function is None:
            results[name] = "not built" if name == "compiled" else "not installed"
            continue
        results[name] = _timings(function, problem, device, repeats, warmup)
    report: Dict[str, object] = {
        "machine": machine_description(device),
        "problem": {
            "levels": LEVELS,
            "queries": problem["value"].shape[1],
            "heads": NUM_HEADS,
            "head_dim": HEAD_DIM,
            "points": NUM_POINTS,
            "batch": 1,
            "dtype": "float32",
            "device": str(device),
            "repeats": repeats,
            "warmup": warmup,
        },
        "results": results,
    }
    compiled = results["compiled"]
    if isinstance(compiled, dict):
        names = ("value", "spatial_shapes", "level_start_index")
        args = [problem[name] for name in names + ("sampling_locations", "attention_weights")]
        with torch.no_grad():
            difference = FORWARD_OP(*args) - multi_scale_deformable_attention_reference(*args)
        report["max_abs_difference_compiled_vs_reference"] = difference.abs().max().item()
        ratios = {}
        for name in ("reference", "torch-ms-deform-attn", "key-aware"):
            if isinstance(results[name], dict):
                ratios[f"{name}/compiled"] = {
                    key: results[name][key] / compiled[key] for key in compiled
                }
        report["ratios"] = ratios
    return report


def format_table(report: Dict[str, object]) -> str:
    machine, problem = report["machine"], report["problem"]
    lines = [
        "multi-scale deformable attention benchmark",
        "machine: " + ", ".join(f"{key} {value}" for key, value in machine.items()),
        f"problem: levels {problem['levels']}, {problem['queries']} queries and values, "
        f"{problem['heads']} heads x {problem['head_dim']} ch, {problem['points']} points, "
        f"batch {problem['batch']}, {problem['dtype']} on {problem['device']}; median of "
        f"{problem['repeats']} runs after {problem['warmup']} warm-up",
        "",
        f"{'implementation':<32}{'forward (ms)':>16}{'forward+backward (ms)':>26}",
    ]
    for name, result in report["results"].items():
        if isinstance(result, dict):
            lines.append(
                f"{name:<32}{result['forward_ms']:>16.1f}{result['forward_backward_ms']:>26.1f}"
            )
        else:
            lines.append(f"{name:<32}{result:>16}")
    if "max_abs_difference_compiled_vs_reference" in report:
        difference = report["max_abs_difference_compiled_vs_reference"]
        lines.append(f"{'max |compiled - reference|':<32}{difference:>16.2e}")
    for name, ratio in report.get("ratios", {}).items():
        lines.append(
            f"{name:<32}{ratio['forward_ms']:>15.2f}x{ratio['forward_backward_ms']:>25.2f}x"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index] (default: cpu)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="also write the results as JSON to PATH; no PATH: print JSON, not the table",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"need --repeats >= 1 and --warmup >= 0, got {args.repeats}, {args.warmup}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = run(device, args.repeats, args.warmup)
    if args.json is None:
        print(format_table(report))
    elif args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        with open(args.json, "w") as output:
            json.dump(report, output, indent=2)
        print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
