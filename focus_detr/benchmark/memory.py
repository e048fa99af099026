"""
Memory of this process: resident set size and its peak (Linux ``/proc/self/status``: ``VmRSS``,
``VmHWM``), the reset of that peak, the return of free pages to the operating system, and the
peak a call adds (process RSS on the CPU, allocated tensors on CUDA).
"""

import ctypes
import ctypes.util
from typing import Callable, Optional

import torch

__all__ = [
    "measure_peak_mb",
    "peak_memory_mb",
    "release_free_memory",
    "reset_peak_memory",
    "resident_memory_mb",
]

_MIB = float(1 << 20)
_JEMALLOC_ALL_ARENAS = 4096  # MALLCTL_ARENAS_ALL


def _status_mib(key: str) -> Optional[float]:
    """The ``key`` line of /proc/self/status (in kB there) in MiB, or None where unavailable."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name == key:
                    return int(value.split()[0]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def resident_memory_mb() -> float:
    """This process's resident memory in MiB (Linux ``VmRSS``, else psutil)."""
    rss = _status_mib("VmRSS")
    if rss is not None:
        return rss
    try:
        import psutil
    except ImportError as error:
        raise RuntimeError("resident memory needs Linux /proc or the psutil package") from error
    return psutil.Process().memory_info().rss / _MIB


def peak_memory_mb() -> Optional[float]:
    """This process's peak resident memory in MiB (Linux ``VmHWM``), or None where unavailable."""
    return _status_mib("VmHWM")


def reset_peak_memory() -> bool:
    """Restart the peak of :func:`peak_memory_mb` from the current RSS; False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def release_free_memory() -> Optional[str]:
    """
    Have the allocator return its free pages to the operating system, so that RSS shows what is
    allocated (live data and fragmentation) rather than what the allocator keeps for reuse.
    Returns how (``"jemalloc purge"`` when jemalloc is preloaded, else ``"malloc_trim"``), or
    None where neither is available.
    """
    mallctl = getattr(ctypes.CDLL(None), "mallctl", None)
    if mallctl is not None:
        name = f"arena.{_JEMALLOC_ALL_ARENAS}.purge".encode()
        if mallctl(ctypes.c_char_p(name), None, None, None, ctypes.c_size_t(0)) == 0:
            return "jemalloc purge"
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        return None
    return "malloc_trim"


def measure_peak_mb(run: Callable[[], None], device: torch.device) -> float:
    """
    MiB that ``run()`` adds at its peak above the memory before it: on a CUDA device
    ``torch.cuda.max_memory_allocated`` (tensors, not the caching allocator's reserve), on the
    CPU the process's peak RSS (memory the allocator reuses from before counts as there).

    Raises:
        OSError: on the CPU where the peak RSS cannot be reset (not Linux).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / _MIB
    before = resident_memory_mb()
    if not reset_peak_memory():  # VmHWM restarts from the current RSS
        raise OSError("cannot reset the peak RSS: /proc/self/clear_refs is not writable")
    run()
    return max(peak_memory_mb() - before, 0.0)
