"""focus_detr.tools.benchmark_train on the tiny model: the report's fields and their consistency."""

import math

import pytest

from focus_detr.engine import precision
from focus_detr.engine.precision import ProbeResult
from focus_detr.tools import benchmark_train
from focus_detr.tools.machine import ISA_FLAGS, ISA_VARIABLES

pytestmark = pytest.mark.usefixtures("single_thread")

TRAINING_SECTIONS = [
    "backbone",
    "neck",
    "encoder",
    "query_selection",
    "decoder",
    "criterion",
    "forward (other)",
    "loss sum + backward",
    "grad clipping + metrics",
    "optimizer step",
]


def _parse(report: str):
    """(``- key: value`` lines as a dict, {section title: table rows as dicts of strings})."""
    fields, tables, title, header = {}, {}, None, None
    for line in report.splitlines():
        if line.startswith("- "):
            key, _, value = line[2:].partition(": ")
            fields[key] = value
        elif line.startswith("## "):
            title, header = line[3:], None
        elif line.startswith("|") and not line.startswith("| ---"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if header is None:
                header = cells
                tables[title] = []
            else:
                tables[title].append(dict(zip(header, cells)))
    return fields, tables


def _run(capsys, *argv):
    assert benchmark_train.main(list(argv)) == 0
    return capsys.readouterr().out


def _check_breakdown(rows, labels, sections):
    by_name = {row["section"]: row for row in rows}
    assert list(by_name) == sections + ["other (outside the sections above)", "total"]
    for label in labels:
        times = {name: float(row[label]) for name, row in by_name.items()}
        assert all(value >= 0 for value in times.values()), times
        assert times["backbone"] > 0 and times["decoder"] > 0, times
        # one decimal per row: allow the rounding of every row
        assert sum(times[name] for name in sections) <= times["total"] + 0.05 * len(sections)
        total = sum(times[name] for name in sections) + times["other (outside the sections above)"]
        assert total == pytest.approx(times["total"], abs=0.05 * (len(sections) + 1))


def test_training_report(tiny_config_file, capsys, tmp_path):
    output = tmp_path / "report.md"
    argv = ["--config-file", tiny_config_file.path, "--iters", "2", "--warmup", "1"]
    argv += ["--precision", "fp32", "bf16", "--with-loader", "--output", str(output)]
    report = _run(capsys, *argv, "optimizer.lr=1e-5")
    assert output.read_text() == report
    fields, tables = _parse(report)
    for key in ("cpu", "torch cpu capability") + ISA_VARIABLES:
        assert fields[key], key
    assert all(fields[f"flag {flag}"] in ("yes", "no", "unknown") for flag in ISA_FLAGS)
    assert fields["torch threads"] == "1"
    assert "fetched before timing (data loading excluded)" in fields["data"]
    assert "grad clipping max_norm 0.1" in fields["step"]

    rows = tables["Time per iteration"]
    labels = [row["precision"] for row in rows]
    assert labels == [
        "float32",
        "float32, live loader",
        "bfloat16 autocast",
        "bfloat16 autocast, live loader",
    ]
    for row in rows:
        mean, median = float(row["s/iter (mean)"]), float(row["s/iter (median)"])
        assert mean > 0 and median > 0
        assert float(row["images/s"]) == pytest.approx(tiny_config_file.batch_size / mean, 0.01)
        data = row["data s/iter (mean)"]
        assert (data == "excluded") == ("live loader" not in row["precision"])
        assert data == "excluded" or math.isfinite(float(data))
    _check_breakdown(tables["Breakdown (mean ms per iteration)"], labels, TRAINING_SECTIONS)
    for row in tables["Breakdown (mean ms per iteration)"]:
        if row["section"] in ("criterion", "loss sum + backward", "optimizer step"):
            assert all(float(row[label]) > 0 for label in labels), row


def test_auto_times_its_choice_once(tiny_config_file, capsys, monkeypatch):
    monkeypatch.setattr(
        precision, "measure_cpu_bfloat16", lambda **sizes: ProbeResult(0.01, 0.1, True, "fake")
    )
    argv = ["--config-file", tiny_config_file.path, "--iters", "1", "--warmup", "0"]
    report = _run(capsys, *argv, "--precision", "auto", "fp32")
    fields, tables = _parse(report)
    assert fields["auto"].startswith("float32 (bfloat16 measured 10.00x slower")
    assert [row["precision"] for row in tables["Time per iteration"]] == ["float32"]


def test_inference_report_on_a_given_size(tiny_config_file, capsys):
    argv = ["--config-file", tiny_config_file.path, "--iters", "2", "--warmup", "1"]
    report = _run(capsys, *argv, "--inference", "--size", "48", "64", "--precision", "fp32")
    fields, tables = _parse(report)
    assert fields["input"] == "random 48x64 image, batch 1, random weights"
    assert report.startswith("# Inference benchmark of ")
    (row,) = tables["Time per iteration"]
    assert float(row["images/s"]) == pytest.approx(1 / float(row["s/iter (mean)"]), 0.01)
    sections = ["backbone", "neck", "encoder", "query_selection", "decoder", "forward (other)"]
    _check_breakdown(tables["Breakdown (mean ms per iteration)"], ["float32"], sections)


def test_inference_on_the_first_val_image(tiny_config_file, capsys):
    argv = ["--config-file", tiny_config_file.path, "--iters", "1", "--warmup", "0"]
    report = _run(capsys, *argv, "--inference", "--val-image", "--precision", "bf16")
    fields, tables = _parse(report)
    assert fields["input"].startswith("first image of test_tools_")
    assert "64x" in fields["input"] or "x64" in fields["input"]  # resized to 64 pixels
    assert [row["precision"] for row in tables["Time per iteration"]] == ["bfloat16 autocast"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--inference"], "--size H W or --val-image"),
        (["--size", "8", "8"], "need --inference"),
        (["--iters", "0"], "--iters >= 1"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--inference", "--size", "0", "8"], "positive H W, got [0, 8]"),
    ],
)
def test_bad_arguments_are_named(extra, message, capsys):
    with pytest.raises(SystemExit):
        benchmark_train.parse_args(["--config-file", "cfg.py"] + extra)
    assert message in capsys.readouterr().err
