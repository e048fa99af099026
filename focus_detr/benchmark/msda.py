"""
Multi-scale deformable attention on the encoder-sized problem of an 800x1333 image: the compiled
op (``focus_detr._C``), the ``grid_sample`` reference, the registry package
``torch-ms-deform-attn`` when installed, and key-aware deformable attention (Lite DETR), timed
side by side.
"""

import statistics
from typing import Callable, Dict, List, Optional

import torch

from focus_detr.layers import (
    key_aware_deformable_attention,
    multi_scale_deformable_attention_reference,
)
from focus_detr.layers.ms_deform_attn_op import FORWARD_OP, compiled_kernel_available

from .report import markdown_table
from .timer import profile_table, time_runs

__all__ = ["LEVELS", "encoder_problem", "time_msda"]

LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))
NUM_HEADS, HEAD_DIM, NUM_POINTS = 8, 32, 4
_OP_ARGS = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "weights")


def encoder_problem(device, *, levels=None, seed: int = 0) -> Dict[str, torch.Tensor]:
    """
    Inputs of one encoder layer, batch 1, float32: every value token is also a query and
    samples a few cells around its own position.
    """
    levels = levels or LEVELS
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.int64)
    sizes = shapes.prod(1)
    num_tokens, num_levels = int(sizes.sum()), len(levels)
    centres = []  # normalized (x, y) centre of every token, level after level
    for height, width in levels:
        ys, xs = torch.meshgrid(
            (torch.arange(height) + 0.5) / height,
            (torch.arange(width) + 0.5) / width,
            indexing="ij",
        )
        centres.append(torch.stack([xs, ys], -1).reshape(-1, 2))
    reference = torch.cat(centres)[None, :, None, None, None, :]
    level_size = shapes.flip(-1).float()[None, None, None, :, None, :]  # (w, h)
    offsets = torch.randn(1, num_tokens, NUM_HEADS, num_levels, NUM_POINTS, 2, generator=generator)
    logits = torch.randn(1, num_tokens, NUM_HEADS, num_levels * NUM_POINTS, generator=generator)

    def tokens(dim: int = HEAD_DIM) -> torch.Tensor:
        return torch.randn(1, num_tokens, NUM_HEADS, dim, generator=generator)

    tensors = {
        "value": tokens(),
        "query": tokens(),  # projected queries and keys of the key-aware attention
        "key": tokens(),
        "spatial_shapes": shapes,
        "level_start_index": torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]]),
        "sampling_locations": reference + 2.0 * offsets / level_size,
        "weights": logits.softmax(-1).view(1, num_tokens, NUM_HEADS, num_levels, -1),
        "grad_output": torch.randn(1, num_tokens, NUM_HEADS * HEAD_DIM, generator=generator),
    }
    return {name: t.to(device) for name, t in tensors.items()}


def _implementations(problem) -> Dict[str, Optional[Callable]]:
    try:
        from torch_ms_deform_attn import ms_deform_attn as peer
    except ImportError:
        peer = None

    def key_aware(value, spatial_shapes, level_start_index, sampling_locations, weights):
        del weights  # computed from the queries and the sampled keys
        query, key = problem["query"], problem["key"]
        locations = sampling_locations
        return key_aware_deformable_attention(
            query, key, value, spatial_shapes, level_start_index, locations
        )[0]

    device = problem["value"].device
    return {
        "compiled": FORWARD_OP if compiled_kernel_available(device) else None,
        "reference": multi_scale_deformable_attention_reference,
        "torch-ms-deform-attn": peer,
        "key-aware": key_aware,
    }


def _steps(function, problem):
    args = [problem[name] for name in _OP_ARGS]
    grad_args = {i: args[i].detach().clone().requires_grad_(True) for i in (0, 3, 4)}
    train_args = [grad_args.get(i, arg) for i, arg in enumerate(args)]

    def forward() -> None:
        with torch.no_grad():
            function(*args)

    def forward_backward() -> None:
        for tensor in grad_args.values():
            tensor.grad = None
        function(*train_args).backward(problem["grad_output"])

    return forward, forward_backward


def time_msda(
    device, *, warmup: int, iters: int, levels=None, profile: bool = False
) -> Dict[str, object]:
    """
    Median milliseconds of the forward and of forward + backward of every implementation, their
    ratios to the compiled op, and its largest difference from the reference.

    Returns:
        ``{"notes": {...}, "lines": markdown lines, "profiles": [(label, table)]}``.
    """
    levels = levels or LEVELS
    problem = encoder_problem(device, levels=levels)
    results: Dict[str, List[float]] = {}
    missing, profiles = [], []
    for name, function in _implementations(problem).items():
        if function is None:
            missing.append(f"{name} ({'not built' if name == 'compiled' else 'not installed'})")
            continue
        results[name] = []
        for step in _steps(function, problem):
            times = time_runs(step, warmup=warmup, iters=iters, device=device)
            results[name].append(1000 * statistics.median(times))
        if profile:
            profiles.append((f"{name}, forward + backward", profile_table(step)))
    compiled = results.get("compiled")
    rows = []
    for name, (forward, backward) in results.items():
        ratio = f"{forward / compiled[0]:.2f} / {backward / compiled[1]:.2f}" if compiled else "-"
        rows.append([name, f"{forward:.1f}", f"{backward:.1f}", ratio])
    header = ["implementation", "forward ms", "forward + backward ms", "time / compiled (both)"]
    notes = {
        "problem": f"levels {list(levels)}, {problem['value'].shape[1]} queries and values, "
        f"{NUM_HEADS} heads x {HEAD_DIM} channels, {NUM_POINTS} points, batch 1, float32 on "
        f"{device}",
        "timing": f"median of {iters} runs after {warmup} warm-up",
    }
    if missing:
        notes["not timed"] = ", ".join(missing)
    if compiled:
        args = [problem[name] for name in _OP_ARGS]
        with torch.no_grad():
            difference = FORWARD_OP(*args) - multi_scale_deformable_attention_reference(*args)
        notes["max |compiled - reference|"] = f"{difference.abs().max().item():.2e}"
    return {"notes": notes, "lines": markdown_table(header, rows), "profiles": profiles}
