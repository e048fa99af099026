"""The markdown report of ``focus_detr.tools.benchmark_train``."""

import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

__all__ = ["STEP", "TimedRun", "format_report"]

STEP = "total"
OTHER = "other (outside the sections above)"


@dataclass
class TimedRun:
    """Seconds of the timed iterations of one precision (and data source)."""

    label: str
    images_per_iter: int
    step_times: List[float]
    sections: Dict[str, float] = field(default_factory=dict)  # seconds, summed over the steps
    data_times: Optional[List[float]] = None  # waiting for the live loader, per step

    @property
    def mean(self) -> float:
        return statistics.fmean(self.step_times)

    @property
    def median(self) -> float:
        return statistics.median(self.step_times)

    def section_means(self, names: Sequence[str]) -> Dict[str, float]:
        """Mean seconds per iteration of each section, the rest as ``OTHER``, and ``STEP``."""
        count = len(self.step_times)
        means = {name: self.sections.get(name, 0.0) / count for name in names}
        means[OTHER] = max(self.mean - sum(means.values()), 0.0)
        means[STEP] = self.mean
        return means


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def format_report(
    *,
    title: str,
    machine: Dict[str, str],
    notes: Sequence[str],
    runs: Sequence[TimedRun],
    sections: Sequence[str],
) -> str:
    """
    Markdown: the title, the machine and the notes as ``- key: value`` lines, a table of
    s/iter (mean, median) and images/s per run, and a table of the mean milliseconds per
    iteration of each section per run (rows in step order, then the rest and the whole step).
    """
    lines = [f"# {title}", ""]
    lines += [f"- {key}: {value}" for key, value in machine.items()]
    lines += [f"- {note}" for note in notes]
    with_data = any(run.data_times is not None for run in runs)
    header = ["precision", "s/iter (mean)", "s/iter (median)", "images/s"]
    rows = []
    for run in runs:
        row = [run.label, f"{run.mean:.4f}", f"{run.median:.4f}"]
        row.append(f"{run.images_per_iter / run.mean:.2f}")
        if with_data:
            data = run.data_times
            row.append("excluded" if data is None else f"{statistics.fmean(data):.4f}")
        rows.append(row)
    lines += ["", "## Time per iteration", ""]
    lines += _table(header + (["data s/iter (mean)"] if with_data else []), rows)
    means = [run.section_means(sections) for run in runs]
    lines += ["", "## Breakdown (mean ms per iteration)", ""]
    breakdown = [
        [name] + [f"{1000 * mean[name]:.1f}" for mean in means]
        for name in list(sections) + [OTHER, STEP]
    ]
    lines += _table(["section"] + [run.label for run in runs], breakdown)
    return "\n".join(lines) + "\n"
