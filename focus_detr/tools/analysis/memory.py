"""
Peak memory of one inference: CUDA from the caching allocator's statistics, CPU from the peak
resident set size of a fresh process.

The CPU measurement runs in a subprocess (``python -m focus_detr.tools.analysis.memory``) so
that no other model, trace or allocator cache of the analysis is in the process: it builds the
model, loads the weights and the inputs, resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``), runs one inference per image and reports the peak RSS minus the
RSS before the inference.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

import focus_detr
from focus_detr.tools.process_memory import peak_memory_mb, reset_peak_memory, resident_memory_mb

from .inputs import model_inputs

__all__ = [
    "CPU_MEMORY_METHOD",
    "cpu_peak_memory_supported",
    "CUDA_MEMORY_METHOD",
    "measure_cpu_peak_memory",
    "measure_cuda_peak_memory",
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
_MIB = float(1 << 20)


def measure_cuda_peak_memory(model: nn.Module, inputs: Sequence[Dict]) -> float:
    """MiB allocated on the model's CUDA device at the peak of the inferences, above before."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"the model is on {device}, not on a CUDA device")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        for item in model_inputs(inputs):
            model([item])
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / _MIB


def cpu_peak_memory_supported() -> bool:
    """Whether this system has the /proc files the CPU measurement reads and writes (Linux)."""
    return os.path.isfile("/proc/self/status") and os.path.exists("/proc/self/clear_refs")


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(focus_detr.__file__)))


def measure_cpu_peak_memory(
    config_file: str,
    *,
    weights: Optional[str],
    overrides: Sequence[str],
    inputs: Sequence[Dict],
    threads: Optional[int] = None,
    timeout: Optional[float] = None,
) -> float:
    """
    MiB of CPU memory one inference per image adds at its peak, measured in a fresh process
    (see the module docstring) that imports this copy of focus_detr.

    Raises:
        RuntimeError: the measuring process failed, with the end of its output.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [_package_root()] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    with tempfile.TemporaryDirectory(prefix="focus_detr_memory_") as folder:
        inputs_file = os.path.join(folder, "inputs.pth")
        result_file = os.path.join(folder, "result.json")
        torch.save(model_inputs(inputs), inputs_file)
        command = [sys.executable, "-m", __name__, "--config-file", config_file]
        command += ["--inputs", inputs_file, "--output", result_file]
        command += ["--weights", weights or ""]
        command += ["--threads", str(threads)] if threads is not None else []
        command += ["--", *overrides]
        process = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if process.returncode != 0 or not os.path.isfile(result_file):
            tail = (process.stdout + process.stderr)[-3000:]
            raise RuntimeError(
                f"the memory measurement of {config_file} failed (exit code "
                f"{process.returncode}):\n{tail}"
            )
        with open(result_file) as f:
            return float(json.load(f)["peak_increase_mib"])


def _measure_in_this_process(args: argparse.Namespace) -> Dict[str, float]:
    from .models import build_analysis_model, load_analyzed_configs

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    (config,) = load_analyzed_configs(
        [args.config_file], weights=[args.weights], overrides=args.opts
    )
    model = build_analysis_model(config, torch.device("cpu"))
    inputs = torch.load(args.inputs, weights_only=True)
    before = resident_memory_mb()
    if not reset_peak_memory():  # VmHWM restarts from the current RSS
        raise OSError("cannot reset the peak RSS: /proc/self/clear_refs is not writable")
    with torch.no_grad():
        for item in inputs:
            model([item])
    peak = peak_memory_mb()
    return {
        "rss_before_mib": before,
        "peak_rss_mib": peak,
        "peak_increase_mib": max(peak - before, 0.0),
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="peak CPU memory of one inference per image")
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", default="")
    parser.add_argument("--inputs", required=True, help="torch.save'd list of model inputs")
    parser.add_argument("--output", required=True, help="JSON file to write")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides after --")
    args = parser.parse_args(argv)
    args.opts = [opt for opt in args.opts if opt != "--"]
    result = _measure_in_this_process(args)
    with open(args.output, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
