"""
Measurements of ``python -m focus_detr.tools.benchmark`` and ``python -m focus_detr.tools.analyze``:
one timer (:mod:`.timer`), one reader of memory (:mod:`.memory`), one description of the machine
(:mod:`.machine`), and the benchmarks: training step and inference (:mod:`.steps`), the
deformable-attention op (:mod:`.msda`) and the memory soak (:mod:`.soak`).
"""

from .machine import describe_machine
from .memory import measure_peak_mb, peak_memory_mb, reset_peak_memory, resident_memory_mb
from .report import TimedRun, format_runs, markdown_table
from .timer import SectionTimer, profile_table, synchronizer, time_runs

__all__ = [
    "SectionTimer",
    "TimedRun",
    "describe_machine",
    "format_runs",
    "markdown_table",
    "measure_peak_mb",
    "peak_memory_mb",
    "profile_table",
    "reset_peak_memory",
    "resident_memory_mb",
    "synchronizer",
    "time_runs",
]
