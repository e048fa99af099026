"""What a benchmark ran on: CPU model and the instruction sets that decide float32 vs bfloat16."""

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


def _parse_cpuinfo_file() -> Tuple[Optional[str], set]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return _parse(cpuinfo)
    except OSError:
        return None, set()


def _parse_lscpu() -> Tuple[Optional[str], set]:
    try:
        result = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None, set()
    return _parse(result.stdout.splitlines())


def read_cpu_info() -> Tuple[str, Optional[set]]:
    """
    (CPU model name, set of CPU flags) from /proc/cpuinfo, else from ``lscpu``; the flags are
    None where neither is available (e.g. not Linux).
    """
    model, flags = _parse_cpuinfo_file()
    if not flags:
        model, flags = _parse_lscpu()
    return model or platform.processor() or platform.machine() or "unknown", flags or None


def describe_machine(device: Optional[torch.device] = None) -> Dict[str, str]:
    """
    Ordered description: ``cpu``, one ``flag <name>`` per :data:`ISA_FLAGS` ("yes" / "no" /
    "unknown"), the :data:`ISA_VARIABLES` ("unset" when unset), ``torch cpu capability``,
    ``torch``, ``torch threads`` and, for a CUDA device, ``gpu``.
    """
    model, flags = read_cpu_info()
    described = {"cpu": model}
    for flag in ISA_FLAGS:
        described[f"flag {flag}"] = (
            "unknown" if flags is None else ("yes" if flag in flags else "no")
        )
    for name in ISA_VARIABLES:
        described[name] = os.environ.get(name, "unset")
    described["torch cpu capability"] = torch.backends.cpu.get_cpu_capability()
    described["torch"] = torch.__version__
    described["torch threads"] = str(torch.get_num_threads())
    if device is not None and device.type == "cuda":
        described["gpu"] = torch.cuda.get_device_name(device)
    return described
