"""The analysis as a markdown report and as JSON."""

import json
import math
import statistics
from typing import Dict, List, Sequence, Tuple

from focus_detr.benchmark.report import markdown_table as _table

from .models import MODEL_PARTS, OTHER_PART

__all__ = ["format_markdown", "to_json", "write_json"]

_PART_LABELS = {part: part.replace("_", " ") for part in (*MODEL_PARTS, OTHER_PART)}


def _number(value, digits: int = 2, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}{suffix}"


def _parts_table(configs: Sequence[Dict], key: str, scale: float, digits: int) -> List[str]:
    header = ["config", "total"] + [_PART_LABELS[p] for p in (*MODEL_PARTS, OTHER_PART)]
    rows = [
        [config["name"]]
        + [
            _number(config[key][part] / scale, digits)
            for part in ("total", *MODEL_PARTS, OTHER_PART)
        ]
        for config in configs
    ]
    return _table(header, rows)


def _per_layer_table(first: str, rows: Sequence[Tuple[str, str, List[str]]]) -> List[str]:
    """A table of (config, first cell, one cell per layer) rows."""
    layers = max(len(cells) for _, _, cells in rows)
    header = ["config", first] + [f"layer {index + 1}" for index in range(layers)]
    body = [[name, cell] + cells + [""] * (layers - len(cells)) for name, cell, cells in rows]
    return _table(header, body)


def _token_tables(configs: Sequence[Dict]) -> List[str]:
    lines = ["", "## Tokens updated per encoder layer (mean per image, share of valid tokens)", ""]
    rows = []
    for config in configs:
        tokens = config["tokens"]
        shares = zip(tokens["updated_per_layer"], tokens["updated_share_per_layer"])
        cells = [f"{value:.0f} ({100 * share:.1f}%)" for value, share in shares]
        rows.append((config["name"], _number(tokens["valid_tokens"], 0), cells))
    lines += _per_layer_table("valid tokens", rows)
    lines += ["", "## Token quality: share of the ground-truth foreground tokens updated", ""]
    rows = []
    for config in configs:
        quality = config.get("token_quality")
        if quality is not None:
            first = f"{quality['foreground_tokens_per_image']:.1f} ({', '.join(quality['ranges'])})"
            cells = [f"{100 * value:.1f}%" for value in quality["foreground_share_per_layer"] or []]
            rows.append((config["name"], first, cells))
    if not rows:
        return lines + ["Needs ground truth: run on dataset images (--dataset NAME)."]
    lines += [
        "Foreground tokens: the targets of Focus-DETR's foreground selector (FCOS-style, per "
        "level object-size ranges: those of one config for all, else each encoder's own or the "
        "reference ranges; a model with fewer levels takes the finest ranges, its coarsest level "
        "every larger object), pooled over the images. Compare each share with the share of "
        "valid tokens the layer updates (table above): a selector that ignores the image scores "
        "the same.",
        "",
    ]
    return lines + _per_layer_table("foreground tokens / image (ranges)", rows)


def _speed_table(configs: Sequence[Dict]) -> List[str]:
    header = ["config", "device", "model ms", "model ms (min)", "encoder ms", "encoder ms (min)"]
    header += ["encoder share", "peak memory MiB"]
    rows = []
    for config in configs:
        for device, latency in config["latency"].items():
            rows.append(
                [
                    config["name"],
                    device,
                    _number(latency["model_ms"], 1),
                    _number(latency["model_ms_min"], 1),
                    _number(latency["encoder_ms"], 1),
                    _number(latency["encoder_ms_min"], 1),
                    _number(100 * latency["encoder_ms"] / latency["model_ms"], 1, "%"),
                    _number(config["peak_memory_mib"].get(device), 1),
                ]
            )
    return _table(header, rows)


def _ratio_table(configs: Sequence[Dict], baseline: str) -> List[str]:
    keys = list(configs[0]["ratios"])
    for config in configs[1:]:
        keys += [key for key in config["ratios"] if key not in keys]
    rows = [
        [config["name"]] + [_number(config["ratios"].get(key), 3) for key in keys]
        for config in configs
    ]
    lines = ["", f"## Ratios to {baseline} (cost of the config / cost of {baseline})", ""]
    return lines + _table(["config"] + [key.replace("_", " ") for key in keys], rows)


def _sweep_table(points: Sequence[Dict]) -> List[str]:
    header = ["config", "keep ratio", "AP", "AP50", "GFLOPs", "encoder GFLOPs", "device"]
    header += ["model ms", "encoder ms"]
    rows = [
        [
            point["name"],
            "-" if point["keep_ratio"] is None else f"{point['keep_ratio']:g}",
            _number(point["AP"], 2),
            _number(point["AP50"], 2),
            _number(point["gflops"], 2),
            _number(point["encoder_gflops"], 2),
            point["device"],
            _number(point["model_ms"], 1),
            _number(point["encoder_ms"], 1),
        ]
        for point in points
    ]
    return _table(header, rows)


def _spread(values: Sequence[float]) -> Tuple[str, str]:
    """("mean ± sample standard deviation", "min-max") of ``values``."""
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return (
        f"{statistics.fmean(values):.2f} ± {deviation:.2f}",
        f"{min(values):.2f}-{max(values):.2f}",
    )


def _seed_table(configs: Sequence[Dict]) -> List[str]:
    rows = []
    for config in configs:
        runs = config.get("seed_runs")
        if runs:
            ap, ap50 = _spread(runs["AP"]), _spread(runs["AP50"])
            rows.append([config["name"], str(len(runs["AP"])), *ap, *ap50])
    if not rows:
        return []
    header = ["config", "runs", "AP mean ± std", "AP min-max", "AP50 mean ± std", "AP50 min-max"]
    lines = ["", "## AP over runs (one checkpoint per training seed)", ""]
    return lines + _table(header, rows)


def format_markdown(report: Dict) -> str:
    """The markdown of a report dict (see ``focus_detr.tools.analyze``)."""
    configs = report["configs"]
    lines = [f"# {report['title']}", ""]
    lines += [f"- {key}: {value}" for key, value in report["machine"].items()]
    lines += [f"- {key}: {value}" for key, value in report["settings"].items()]
    lines += ["", "## Configs", ""]
    lines += _table(
        ["config", "file", "encoder", "keep ratio", "weights", "input"],
        [
            [
                config["name"],
                config["config_file"],
                config["encoder"],
                "-" if config["keep_ratio"] is None else f"{config['keep_ratio']:g}",
                config["weights"] or "random",
                config["input"],
            ]
            for config in configs
        ],
    )
    lines += ["", "## Parameters (millions)", ""]
    lines += _parts_table(configs, "parameters", 1e6, 2)
    lines += ["", "## GFLOPs per image (fvcore: one multiply-add = one flop)", ""]
    lines += _parts_table(configs, "gflops", 1.0, 2)
    uncounted = sorted({op for config in configs for op in config["uncounted_ops"]})
    lines += ["", f"Not counted (no FLOP handle): {', '.join(uncounted) or 'none'}."]
    lines += ["", "## Latency (ms per image: median and fastest) and peak memory", ""]
    lines += _speed_table(configs)
    if report.get("baseline"):
        lines += _ratio_table(configs, report["baseline"])
    lines += _token_tables(configs)
    lines += _seed_table(configs)
    if report.get("sweep"):
        lines += ["", "## Keep-ratio sweep: accuracy for speed", ""]
        lines += [f"{report['sweep_evaluation']}.", ""]
        lines += _sweep_table(report["sweep"])
        if report.get("files", {}).get("plot"):
            lines += ["", f"![AP against GFLOPs]({report['files']['plot']})"]
    return "\n".join(lines) + "\n"


def to_json(value):
    """``value`` with non-finite floats replaced by None (strict JSON) and tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(item) for item in value]
    return value


def write_json(report: Dict, path: str) -> None:
    """Write the report as strict JSON (no NaN / Infinity)."""
    with open(path, "w") as f:
        json.dump(to_json(report), f, indent=2, allow_nan=False)
        f.write("\n")
