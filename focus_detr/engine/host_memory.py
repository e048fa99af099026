"""
The C heap of long training runs.

glibc's ``malloc`` serves a request above its *mmap threshold* with a mapping of its own, which
goes back to the system when freed, and smaller requests from the heap. The threshold adapts:
every mapped block that is freed raises it to that block's size (up to 32 MiB). After the first
large activations of a training run, blocks of many MiB therefore come from the heap; when the
image sizes change from step to step (COCO, random resizing, the soak test) the freed blocks
leave holes that later requests of other sizes fit only in part, and the resident memory grows
by tens of MiB per thousand steps (``python -m focus_detr.tools.soak``).

Two remedies were measured on the demo config: a fixed low threshold (64 KiB) keeps the resident
memory flat but maps and faults in every large tensor again at every step (the training step took
1.65x as long), so it is not used; returning the heap's free pages to the system every few dozen
steps (``malloc_trim``, :class:`HeapTrimHook`) keeps it flat at a cost too small to measure.
``train.host_memory.trim_period`` sets the period (0 disables it).
"""

import ctypes
import ctypes.util
import logging

from detectron2.engine import HookBase

__all__ = ["HeapTrimHook", "release_free_heap"]

logger = logging.getLogger(__name__)


def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def release_free_heap() -> bool:
    """
    Give the C heap's free memory back to the operating system (glibc ``malloc_trim(0)``: the
    top of the heap and every free page inside it). Returns False where the C library has no
    ``malloc_trim`` (not glibc); nothing changes there.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class HeapTrimHook(HookBase):
    """
    Every ``period`` steps, returns the C heap's free pages to the system (glibc
    ``malloc_trim``), so that a long run with changing image sizes keeps a flat resident memory.
    Does nothing (and logs that once) where the C library is not glibc.
    """

    def __init__(self, period: int):
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"trim period must be an int >= 1 (steps), got {period!r}")
        self.period = period
        self.available = _malloc_trim() is not None
        if not self.available:
            logger.info("host memory: no glibc malloc_trim here, the heap is not trimmed")

    def after_step(self) -> None:
        if self.available and (self.trainer.iter + 1) % self.period == 0:
            release_free_heap()
