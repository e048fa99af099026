"""
This process's resident memory and its peak, from Linux's ``/proc/self/status`` (``VmRSS``,
``VmHWM``), and the reset of that peak (``/proc/self/clear_refs``). Used by the soak tool and by
the analysis tool's CPU peak-memory measurement.
"""

from typing import Optional

__all__ = ["peak_memory_mb", "reset_peak_memory", "resident_memory_mb"]


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
    return psutil.Process().memory_info().rss / 2**20


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
