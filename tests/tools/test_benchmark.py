"""python -m focus_detr.tools.benchmark: every mode on tiny settings prints its figures."""

import itertools
import re

import pytest
import torch

from focus_detr.benchmark import msda, soak
from focus_detr.layers.ms_deform_attn_op import compiled_kernel_available
from focus_detr.tools import benchmark

pytestmark = pytest.mark.usefixtures("single_thread")

MACHINE_KEYS = ("cpu", "cpu flags", "isa limits", "torch cpu capability", "torch threads")
MACHINE_KEYS += ("allocator",)
TRAINING_SECTIONS = ["backbone", "neck", "encoder", "query_selection", "decoder", "criterion"]
TRAINING_SECTIONS += ["forward (other)", "loss sum + backward", "grad clipping + metrics"]
TRAINING_SECTIONS += ["optimizer step"]
REST = ["other (outside the sections above)", "total"]


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
                header, tables[title] = cells, []
            else:
                tables[title].append(dict(zip(header, cells)))
    return fields, tables


def _run(capsys, *argv):
    assert benchmark.main(list(argv)) == 0
    return capsys.readouterr().out


def _check_breakdown(rows, labels, sections):
    by_name = {row["section"]: row for row in rows}
    assert list(by_name) == sections + REST
    for label in labels:
        ms = {name: float(row[label]) for name, row in by_name.items()}
        assert all(value >= 0 for value in ms.values()), ms
        assert ms["backbone"] > 0 and ms["decoder"] > 0, ms
        # one decimal per row: allow the rounding of every row
        parts = sum(ms[name] for name in sections)
        assert parts <= ms["total"] + 0.05 * len(sections)
        assert parts + ms[REST[0]] == pytest.approx(ms["total"], abs=0.05 * (len(sections) + 1))


def test_training_step_in_two_precisions_side_by_side(tiny_config_file, capsys, tmp_path):
    output = tmp_path / "report.md"
    argv = ["train", "--config-file", tiny_config_file.path, "--iters", "2", "--warmup", "1"]
    report = _run(capsys, *argv, "--output", output, "optimizer.lr=1e-5")
    assert output.read_text() == report
    fields, tables = _parse(report)
    assert all(fields[key] for key in MACHINE_KEYS), fields
    assert fields["torch threads"] == "1"
    assert fields["config"] == f"{tiny_config_file.path} optimizer.lr=1e-5"
    assert "fetched before timing" in fields["data"]
    assert "grad clipping max_norm 0.1" in fields["step"]
    rows = tables["Time per iteration"]
    assert [row["run"] for row in rows] == ["float32", "bfloat16 autocast"]
    first = float(rows[0]["s/iter (median)"])
    for row in rows:
        median = float(row["s/iter (median)"])
        assert median > 0 and float(row["s/iter (mean)"]) > 0
        assert float(row["images/s"]) == pytest.approx(tiny_config_file.batch_size / median, 0.01)
        # from the rounded medians of the table
        assert float(row["time / float32"]) == pytest.approx(median / first, rel=0.02, abs=2e-3)
    breakdown = tables["Breakdown (mean ms per iteration)"]
    _check_breakdown(breakdown, ["float32", "bfloat16 autocast"], TRAINING_SECTIONS)
    for row in breakdown:
        if row["section"] in ("criterion", "loss sum + backward", "optimizer step"):
            assert float(row["float32"]) > 0 and float(row["bfloat16 autocast"]) > 0, row


def test_training_with_the_live_loader_and_the_profiler(tiny_config_file, capsys):
    argv = ["train", "--config-file", tiny_config_file.path, "--iters", "1", "--warmup", "0"]
    report = _run(capsys, *argv, "--precision", "fp32", "--with-loader", "--profile")
    fields, tables = _parse(report)
    assert "the live training loader" in fields["data"]
    assert [row["run"] for row in tables["Time per iteration"]] == ["float32, live loader"]
    assert "## torch.profiler, float32, live loader: one run" in report
    assert "Self CPU" in report


def test_inference_on_a_given_size(tiny_config_file, capsys):
    argv = ["inference", "--config-file", tiny_config_file.path, "--iters", "2", "--warmup", "1"]
    report = _run(capsys, *argv, "--size", "48", "64", "--precision", "fp32")
    assert report.startswith("# Inference benchmark of ")
    fields, tables = _parse(report)
    assert fields["input"] == "random 48x64 image, batch 1, random weights"
    (row,) = tables["Time per iteration"]
    assert float(row["images/s"]) == pytest.approx(1 / float(row["s/iter (median)"]), 0.01)
    sections = ["backbone", "neck", "encoder", "query_selection", "decoder", "forward (other)"]
    _check_breakdown(tables["Breakdown (mean ms per iteration)"], ["float32"], sections)


def test_inference_on_the_first_val_image(tiny_config_file, capsys):
    argv = ["inference", "--config-file", tiny_config_file.path, "--iters", "1", "--warmup", "0"]
    report = _run(capsys, *argv, "--val-image", "--precision", "bf16")
    fields, tables = _parse(report)
    assert fields["input"].startswith("first image of test_tools_")
    assert "64x" in fields["input"] or "x64" in fields["input"]  # resized to 64 pixels
    assert [row["run"] for row in tables["Time per iteration"]] == ["bfloat16 autocast"]


def test_msda_on_tiny_levels(monkeypatch, capsys):
    monkeypatch.setattr(msda, "LEVELS", ((5, 7), (3, 4)))
    report = _run(capsys, "msda", "--iters", "1", "--warmup", "0", "--profile")
    fields, tables = _parse(report)
    assert fields["problem"].startswith("levels [(5, 7), (3, 4)], 47 queries and values")
    rows = {row["implementation"]: row for row in tables[None]}
    for name in ("reference", "key-aware"):
        assert float(rows[name]["forward ms"]) > 0, name
        assert float(rows[name]["forward + backward ms"]) > 0, name
    assert "## torch.profiler, reference, forward + backward" in report
    if compiled_kernel_available("cpu"):
        assert float(fields["max |compiled - reference|"]) < 1e-4
        assert rows["compiled"]["time / compiled (both)"] == "1.00 / 1.00"
        ratios = rows["reference"]["time / compiled (both)"].split(" / ")
        assert len(ratios) == 2 and all(float(ratio) > 0 for ratio in ratios)
    else:
        assert "compiled (not built)" in fields["not timed"]


def test_soak_batches_hold_extreme_sizes_empty_and_crowded_images_with_valid_boxes():
    batches = soak.random_batches(batch_size=4, max_side=50, num_classes=3, crowd=40, seed=1)
    images = [d for batch in itertools.islice(batches, 60) for d in batch]
    assert set(soak.extreme_sizes(50)) <= {(d["height"], d["width"]) for d in images}
    counts = [len(d["instances"]) for d in images]
    assert 0 in counts and 40 in counts and any(0 < c <= 8 for c in counts)
    for d in images:
        height, width = d["image"].shape[1:]
        assert (height, width) == (d["height"], d["width"]) == d["instances"].image_size
        boxes = d["instances"].gt_boxes.tensor
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= height).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (d["instances"].gt_classes < 3).all()


def test_soak_verdict_is_on_the_slope_after_warm_up():
    flat = [(i, 1000.0 + (5.0 if i < 100 else 0.0) + 0.1 * (i % 3)) for i in range(0, 1000, 50)]
    stable, summary = soak.verdict(flat, warmup=100, max_slope=5.0)
    assert stable and summary.startswith("STABLE")
    growing = [(i, 1000.0 + 0.02 * i) for i in range(0, 1000, 50)]  # 20 MiB per 1000
    stable, summary = soak.verdict(growing, warmup=100, max_slope=5.0)
    assert not stable and "GROWING" in summary and "+20.00 MiB per 1000" in summary
    stable, summary = soak.verdict(growing[:4], warmup=100, max_slope=5.0)
    assert not stable and summary.startswith("no verdict")


@pytest.mark.parametrize("options", [[], ["--repeat", "2", "--release"]])
def test_a_short_soak_reports_memory_and_a_verdict(tiny_config_file, capsys, options):
    argv = ["soak", "--config-file", tiny_config_file.path, "--iters", "4", "--report-every", "1"]
    argv += ["--warmup", "1", "--max-side", "40", "--crowd", "30", *options]
    status = benchmark.main(argv)
    output = capsys.readouterr().out
    assert re.search(r"\[soak\] cpu .*, allocator ", output), output
    if options:
        assert "2 batches repeated" in output
        assert re.search("RSS every 1 after (jemalloc purge|malloc_trim), ", output), output
    else:
        assert "RSS every 1, warm-up 1" in output
    reports = re.findall(
        r"\[soak\] iteration +(\d+)  RSS +([\d.]+) MiB  \(peak since last +([\d.]+) MiB", output
    )
    assert [int(i) for i, _, _ in reports] == [1, 2, 3, 4], output
    # the peak is a high-water mark: at least the memory read after it
    assert all(float(peak) >= float(mb) > 10 for _, mb, peak in reports)
    verdict = re.search(r"\[soak\] verdict: (STABLE|GROWING): .* slope ([-+][\d.]+) MiB", output)
    assert verdict, output
    assert status == (0 if verdict.group(1) == "STABLE" else 1)


def test_a_failing_soak_step_names_the_batch_it_failed_on(tiny_config_file, capsys, monkeypatch):
    def fail_at_iteration_1(trainer):
        batch = next(trainer._data_loader_iter)
        if trainer.iter == 1:
            raise ValueError("boom")
        return batch

    monkeypatch.setattr(soak.DETRTrainer, "run_step", fail_at_iteration_1)
    argv = ["soak", "--config-file", tiny_config_file.path, "--iters", "3", "--max-side", "20"]
    with pytest.raises(ValueError, match="boom"):
        benchmark.main(argv)
    batches = soak.random_batches(batch_size=2, max_side=20, num_classes=6, crowd=150, seed=0)
    expected = list(itertools.islice(batches, 2))[1]
    described = [(d["height"], d["width"], len(d["instances"])) for d in expected]
    assert f"FAILED at iteration 1 on a batch of (height, width, boxes) {described}" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train"], "the following arguments are required: --config-file"),
        (["train", "--config-file", "c.py", "--iters", "0"], "--iters: must be >= 1, got 0"),
        (["train", "--config-file", "c.py", "--threads", "0"], "--threads: must be >= 1, got 0"),
        (["train", "--config-file", "c.py", "--precision", "fp64"], "invalid choice: 'fp64'"),
        (["inference", "--config-file", "c.py"], "one of the arguments --size --val-image"),
        (["inference", "--config-file", "c.py", "--size", "0", "8"], "must be >= 1, got 0"),
        (["msda", "--warmup", "-1"], "--warmup: must be >= 0, got -1"),
        (["msda", "a.b=1"], "msda takes no config overrides, got ['a.b=1']"),
        (["soak", "--report-every", "0"], "--report-every: must be >= 1, got 0"),
        (["timing"], "invalid choice: 'timing'"),
    ],
)
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_msda_on_cuda_without_cuda_says_so(capsys):
    assert benchmark.main(["msda", "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
