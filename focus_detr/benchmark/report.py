"""Markdown of the measurements: tables, and the report of timed runs with their breakdown."""

import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

__all__ = ["TimedRun", "format_runs", "markdown_table"]

OTHER = "other (outside the sections above)"
STEP = "total"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    """The lines of a markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


@dataclass
class TimedRun:
    """
    One timed configuration: ``seconds`` of each timed iteration, ``images`` per iteration and
    ``sections``: seconds per section summed over the iterations, in step order.
    """

    label: str
    images: int
    seconds: List[float]
    sections: Dict[str, float] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def section_ms(self) -> Dict[str, float]:
        """Mean milliseconds per iteration of every section, the rest, and the whole step."""
        mean = statistics.fmean(self.seconds)
        count = len(self.seconds)
        means = {name: value / count for name, value in self.sections.items()}
        means[OTHER] = max(mean - sum(means.values()), 0.0)
        means[STEP] = mean
        return {name: 1000 * value for name, value in means.items()}


def format_runs(title: str, machine: Dict[str, str], notes: Dict[str, str], runs) -> str:
    """
    Markdown: the title, the machine and the notes as ``- key: value`` lines, the time per
    iteration of every run with its ratio to the first run (timed side by side in one
    process), and the mean milliseconds per iteration of each section per run.
    """
    lines = [f"# {title}", ""]
    lines += [f"- {key}: {value}" for key, value in {**machine, **notes}.items()]
    first = runs[0].median
    header = ["run", "s/iter (median)", "s/iter (mean)", "images/s", f"time / {runs[0].label}"]
    rows = [
        [
            run.label,
            f"{run.median:.4f}",
            f"{statistics.fmean(run.seconds):.4f}",
            f"{run.images / run.median:.2f}",
            f"{run.median / first:.3f}",
        ]
        for run in runs
    ]
    lines += ["", "## Time per iteration", ""] + markdown_table(header, rows)
    if any(run.sections for run in runs):
        means = [run.section_ms() for run in runs]
        rows = [[name] + [f"{mean[name]:.1f}" for mean in means] for name in means[0]]
        lines += ["", "## Breakdown (mean ms per iteration)", ""]
        lines += markdown_table(["section"] + [run.label for run in runs], rows)
    return "\n".join(lines) + "\n"
