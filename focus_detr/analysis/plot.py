"""The accuracy-for-speed plot of a keep-ratio sweep: AP against GFLOPs, one curve per config."""

import math
from collections import OrderedDict
from typing import Dict, List, Sequence

from matplotlib.figure import Figure

__all__ = ["plot_sweep"]


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def plot_sweep(points: Sequence[Dict], path: str, *, title: str = "") -> None:
    """
    Write a PNG with two panels, AP against the model's GFLOPs and against the encoder's
    GFLOPs: one line (marked with its keep ratios) per config with a keep ratio, one marker per
    config without. Points without a finite AP are left out.

    Args:
        points: sweep points with ``name``, ``keep_ratio`` (None: no keep ratio), ``AP``,
            ``gflops`` and ``encoder_gflops``.
        path: the PNG file.
    """
    by_config: "OrderedDict[str, List[Dict]]" = OrderedDict()
    for point in points:
        if _finite(point.get("AP")):
            by_config.setdefault(point["name"], []).append(point)
    figure = Figure(figsize=(12, 5), dpi=100)
    panels = figure.subplots(1, 2)
    for panel, key, label in (
        (panels[0], "gflops", "model GFLOPs"),
        (panels[1], "encoder_gflops", "encoder GFLOPs"),
    ):
        for name, curve in by_config.items():
            curve = sorted(curve, key=lambda point: point[key])
            xs = [point[key] for point in curve]
            ys = [point["AP"] for point in curve]
            if curve[0]["keep_ratio"] is None:
                panel.plot(xs, ys, marker="s", linestyle="none", markersize=8, label=name)
                continue
            panel.plot(xs, ys, marker="o", label=name)
            for point in curve:
                panel.annotate(
                    f"{point['keep_ratio']:g}",
                    (point[key], point["AP"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=8,
                )
        panel.set_xlabel(label)
        panel.set_ylabel("box AP")
        panel.grid(True, alpha=0.3)
    if by_config:
        panels[0].legend(fontsize=8)
    else:
        for panel in panels:
            panel.text(0.5, 0.5, "no finite AP", ha="center", transform=panel.transAxes)
    figure.suptitle(title or "AP against GFLOPs (numbers: keep ratio)")
    figure.tight_layout()
    figure.savefig(path, format="png")
