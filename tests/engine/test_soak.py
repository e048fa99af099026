"""The memory soak tool (focus_detr.tools.soak), briefly: its batches, verdict and a short run."""

import itertools
import re

import pytest
from helpers import DEMO_CONFIG

from focus_detr.tools import soak
from focus_detr.tools.process_memory import peak_memory_mb, reset_peak_memory, resident_memory_mb

pytestmark = pytest.mark.usefixtures("single_thread")


def test_batches_hold_extreme_sizes_empty_and_crowded_images_with_valid_boxes():
    batches = soak.random_batches(batch_size=4, max_side=50, num_classes=3, crowd=40, seed=1)
    images = [d for batch in itertools.islice(batches, 60) for d in batch]
    sizes = {(d["height"], d["width"]) for d in images}
    assert set(soak._sizes(50)) <= sizes
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


def test_verdict_is_on_the_slope_after_warm_up():
    flat = [(i, 1000.0 + (5.0 if i < 100 else 0.0) + 0.1 * (i % 3)) for i in range(0, 1000, 50)]
    stable, summary = soak.verdict(flat, warmup=100, max_slope=5.0)
    assert stable and summary.startswith("STABLE")
    growing = [(i, 1000.0 + 0.02 * i) for i in range(0, 1000, 50)]  # 20 MiB per 1000
    stable, summary = soak.verdict(growing, warmup=100, max_slope=5.0)
    assert not stable and "GROWING" in summary and "+20.00 MiB per 1000" in summary
    stable, summary = soak.verdict(growing[:4], warmup=100, max_slope=5.0)
    assert not stable and summary.startswith("no verdict")


@pytest.mark.parametrize("options", [[], ["--repeat", "2", "--release"]])
def test_a_short_soak_reports_memory_and_a_verdict(capsys, options):
    status = soak.main(
        options
        + [
            "--config-file",
            str(DEMO_CONFIG),
            "--iterations",
            "4",
            "--report-every",
            "1",
            "--purge-period",
            "1",
            "--warmup",
            "1",
            "--max-side",
            "40",
            "--crowd",
            "30",
            "train.amp.enabled=False",
        ]
    )
    output = capsys.readouterr().out
    if options:
        assert "2 batches repeated" in output
        assert re.search("RSS every 1 after (jemalloc purge|malloc_trim), ", output), output
    else:
        assert "RSS every 1, warm-up 1" in output
    reports = re.findall(
        r"\[soak\] iteration +(\d+)  RSS +([\d.]+) MiB  \(peak since last +([\d.]+) MiB", output
    )
    assert [int(i) for i, _, _ in reports] == [1, 2, 3, 4], output
    # the peak is a high-water mark: at least the memory after the purge
    assert all(float(peak) >= float(mb) > 10 for _, mb, peak in reports)
    verdict = re.search(r"\[soak\] verdict: (STABLE|GROWING): .* slope ([-+][\d.]+) MiB", output)
    assert verdict, output
    assert status == (0 if verdict.group(1) == "STABLE" else 1)


def test_a_failing_step_names_the_batch_it_failed_on(capsys, monkeypatch):
    def fail_at_iteration_1(trainer):
        batch = next(trainer._data_loader_iter)
        if trainer.iter == 1:
            raise ValueError("boom")
        return batch

    monkeypatch.setattr(soak.DETRTrainer, "run_step", fail_at_iteration_1)
    argv = ["--config-file", str(DEMO_CONFIG), "--iterations", "3", "--max-side", "20"]
    with pytest.raises(ValueError, match="boom"):
        soak.main(argv)
    expected = list(
        itertools.islice(
            soak.random_batches(batch_size=2, max_side=20, num_classes=6, crowd=150, seed=0), 2
        )
    )[1]
    described = [(d["height"], d["width"], len(d["instances"])) for d in expected]
    assert f"FAILED at iteration 1 on a batch of (height, width, boxes) {described}" in (
        capsys.readouterr().out
    )


@pytest.mark.skipif(peak_memory_mb() is None, reason="needs Linux /proc VmHWM")
def test_the_peak_restarts_from_the_current_memory_after_a_reset():
    assert reset_peak_memory()
    block = b"x" * (200 << 20)
    del block
    soak.release_free_memory()  # jemalloc may keep the freed pages otherwise
    assert peak_memory_mb() - resident_memory_mb() > 150
    assert reset_peak_memory()
    assert peak_memory_mb() - resident_memory_mb() < 20


def test_memory_is_read_right_after_a_purge():
    argv = ["--config-file", str(DEMO_CONFIG), "--report-every", "30", "--purge-period", "20"]
    with pytest.raises(SystemExit, match=r"--report-every \(30\) must be a multiple of --purge"):
        soak.main(argv)
    with pytest.raises(SystemExit, match="--purge-period must be >= 1, got 0"):
        soak.main(argv[:2] + ["--purge-period", "0"])
