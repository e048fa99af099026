"""What a measurement ran on: CPU model and instruction sets, torch, threads, allocator, GPU."""

import os
import platform
import subprocess
from typing import Dict, Iterable, Optional, Tuple

import torch

__all__ = ["ISA_FLAGS", "ISA_VARIABLES", "describe_machine", "read_cpu_info"]

# CPU flags (as /proc/cpuinfo and lscpu spell them) that decide the speed of float32 and bfloat16.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
# Environment variables that limit the instruction sets PyTorch's kernels and oneDNN use.
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def _parse(lines: Iterable[str]) -> Tuple[Optional[str], set]:
    """(model name, flags) of the first processor in /proc/cpuinfo or lscpu lines."""
    model, flags = None, set()
    for line in lines:
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def _cpuinfo_lines():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return cpuinfo.read().splitlines()
    except OSError:
        return []


def _lscpu_lines():
    try:
        result = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    return result.stdout.splitlines()


def read_cpu_info() -> Tuple[str, Optional[set]]:
    """
    (CPU model name, set of CPU flags) from /proc/cpuinfo, else from ``lscpu``; the flags are
    None where neither has them (e.g. not Linux).
    """
    model, flags = _parse(_cpuinfo_lines())
    if not flags:
        model, flags = _parse(_lscpu_lines())
    return model or platform.processor() or platform.machine() or "unknown", flags or None


def _allocator() -> str:
    """The malloc this process runs on: a preloaded jemalloc / tcmalloc / mimalloc, else the
    system's (read from the libraries mapped into the process)."""
    try:
        with open("/proc/self/maps") as maps:
            libraries = {line.split()[-1] for line in maps if ".so" in line}
    except OSError:
        return "unknown"
    for name in _ALLOCATORS:
        found = sorted(path for path in libraries if name in os.path.basename(path))
        if found:
            return f"{name} ({found[0]})"
    return "system malloc"


def describe_machine(device: Optional[torch.device] = None) -> Dict[str, str]:
    """
    ``cpu`` (model name), ``cpu flags`` (those of :data:`ISA_FLAGS` the CPU has, or
    "unknown"), ``isa limits`` (the :data:`ISA_VARIABLES` set), ``torch cpu capability``,
    ``torch``, ``torch threads``, ``allocator`` and, for a CUDA device, ``gpu``.
    """
    model, flags = read_cpu_info()
    present = "unknown" if flags is None else " ".join(f for f in ISA_FLAGS if f in flags)
    limits = [f"{name}={os.environ[name]}" for name in ISA_VARIABLES if name in os.environ]
    described = {
        "cpu": model,
        "cpu flags": present or f"none of {' '.join(ISA_FLAGS)}",
        "isa limits": " ".join(limits) or "none",
        "torch cpu capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
        "allocator": _allocator(),
    }
    if device is not None and torch.device(device).type == "cuda":
        described["gpu"] = torch.cuda.get_device_name(device)
    return described
