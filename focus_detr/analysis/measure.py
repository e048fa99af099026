"""
Inference latency of a whole model and of its encoder, and peak memory: on CUDA from the caching
allocator's statistics, on the CPU from the peak resident set size of a fresh process, in which
no other model, trace or allocator cache of the analysis is.
"""

import functools
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from focus_detr.benchmark.memory import measure_peak_mb, peak_memory_mb
from focus_detr.benchmark.timer import SectionTimer, time_runs

from .inputs import model_inputs

__all__ = [
    "CPU_MEMORY_METHOD",
    "CUDA_MEMORY_METHOD",
    "cpu_peak_memory_supported",
    "measure_cpu_peak_memory",
    "measure_latency",
    "measure_peak_memory",
]

CPU_MEMORY_METHOD = (
    "CPU: peak resident set size (VmHWM, reset through /proc/self/clear_refs) during one "
    "inference per image in a fresh process, minus the resident size after the model was built "
    "and the inputs loaded; memory the allocator reuses from building counts as already there"
)
CUDA_MEMORY_METHOD = (
    "CUDA: torch.cuda.max_memory_allocated during one inference per image minus the memory "
    "allocated before it (tensors only, not the caching allocator's reserve)"
)


def measure_latency(
    model: nn.Module, inputs: Sequence[Dict], *, warmup: int, iters: int
) -> Dict[str, object]:
    """
    Per image (batch 1), ``warmup`` untimed and ``iters`` timed inferences (eval mode, no_grad,
    the model's own precision), the encoder timed by forward hooks during the same inferences.

    Returns:
        median and fastest milliseconds of the model and of the encoder per forward, the number
        of forwards and every forward's milliseconds (to judge the noise).
    """
    if model.training:
        raise ValueError("time a model in eval mode")
    device = next(model.parameters()).device
    timer = SectionTimer(model, modules=("encoder",))
    model_ms, encoder_ms = [], []
    try:
        with torch.no_grad():
            for item in model_inputs(inputs):
                run = functools.partial(model, [item])
                seconds = time_runs(run, warmup=warmup, iters=iters, device=device, sections=timer)
                model_ms += [1000 * value for value in seconds]
                encoder_ms += [1000 * value for value in timer.times["encoder"]]
    finally:
        timer.remove()
    if len(encoder_ms) != len(model_ms):
        raise RuntimeError(f"the encoder ran {len(encoder_ms)} times in {len(model_ms)} inferences")
    return {
        "model_ms": statistics.median(model_ms),
        "encoder_ms": statistics.median(encoder_ms),
        "model_ms_min": min(model_ms),
        "encoder_ms_min": min(encoder_ms),
        "forwards": len(model_ms),
        "model_ms_all": model_ms,
        "encoder_ms_all": encoder_ms,
    }


def measure_peak_memory(model: nn.Module, inputs: Sequence[Dict]) -> float:
    """MiB that one inference per image adds at its peak, in this process (see
    :func:`~focus_detr.benchmark.memory.measure_peak_mb`)."""
    device = next(model.parameters()).device

    def run() -> None:
        with torch.no_grad():
            for item in model_inputs(inputs):
                model([item])

    return measure_peak_mb(run, device)


def _peak_in_this_process(config_file, weights, overrides, inputs, threads) -> float:
    from .models import build_analysis_model, load_analyzed_configs

    torch.set_num_threads(threads)
    (config,) = load_analyzed_configs([config_file], weights=[weights or ""], overrides=overrides)
    return measure_peak_memory(build_analysis_model(config, torch.device("cpu")), inputs)


def cpu_peak_memory_supported() -> bool:
    """Whether the peak RSS of a process can be read and reset here (Linux)."""
    return peak_memory_mb() is not None and os.access("/proc/self/clear_refs", os.W_OK)


def measure_cpu_peak_memory(
    config_file: str,
    *,
    weights: Optional[str],
    overrides: Sequence[str],
    inputs: Sequence[Dict],
    threads: int,
) -> float:
    """
    MiB of CPU memory one inference per image adds at its peak, in a fresh (spawned) process
    that builds the config's model with its weights on the CPU.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        args = (config_file, weights, list(overrides), model_inputs(inputs), threads)
        return pool.submit(_peak_in_this_process, *args).result()
