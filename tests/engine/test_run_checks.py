"""
A run never destroys what an earlier run wrote, and never loads weights that do not fit
(focus_detr.engine.run_checks through train_net.py's main): without --resume a folder with
checkpoints stops the run before anything is written; --resume continues from the newest intact
checkpoint, stops when none is, and writes nothing when the config does not fit; a complete run
resumed is only evaluated; --eval-only needs weights that fit, or --random-weights.
"""

import hashlib
import os
import shutil

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from helpers import (
    CONFIG_DIR,
    import_train_net,
    read_metrics,
    shrink_model_config,
    tiny_train_config,
)

from focus_detr.engine import RunDirError

pytestmark = pytest.mark.usefixtures("single_thread")

train_net = import_train_net()


def _main(config_file, output_dir, *options, overrides=()):
    argv = ["--config-file", str(config_file), *options, f"train.output_dir={output_dir}"]
    return train_net.main(train_net.build_parser().parse_args(argv + list(overrides)))


def _snapshot(folder):
    """Every file of ``folder``: its size, modification time and content hash."""
    return {
        name: (
            os.path.getsize(folder / name),
            os.stat(folder / name).st_mtime_ns,
            hashlib.sha256((folder / name).read_bytes()).hexdigest(),
        )
        for name in sorted(os.listdir(folder))
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shapes):
    """A complete 2-iteration run through main: checkpoints of iterations 0 and 1 (and final)."""
    folder = tmp_path_factory.mktemp("finished")
    cfg = tiny_train_config(folder / "unused", shapes.names, max_iter=2)
    cfg.train.checkpointer.period = 1
    config_file = folder / "config.py.yaml"
    LazyConfig.save(cfg, str(config_file))
    _main(config_file, folder / "run")
    assert {"model_0000000.pth", "model_final.pth", "config.yaml"} <= set(
        os.listdir(folder / "run")
    )
    return config_file, folder / "run"


@pytest.fixture
def run_copy(finished, tmp_path):
    config_file, run = finished
    shutil.copytree(run, tmp_path / "run")  # keeps modification times
    return config_file, tmp_path / "run"


def test_training_into_a_folder_with_checkpoints_needs_resume_or_overwrite(run_copy):
    config_file, run = run_copy
    before = _snapshot(run)
    with pytest.raises(RunDirError) as error:
        _main(config_file, run)
    message = str(error.value)
    assert f"{run} holds the checkpoints of an earlier run" in message
    assert "last_checkpoint" in message and "model_final.pth" in message
    assert "--resume" in message and "train.overwrite=True" in message
    assert _snapshot(run) == before  # no log line, no config.yaml, no checkpoint

    _main(config_file, run, overrides=["train.overwrite=True", "train.max_iter=1"])
    fresh = torch.load(run / "model_final.pth", weights_only=True)
    assert fresh["trainer"]["iteration"] == 0  # trained anew, as asked


def test_resume_without_last_checkpoint_continues_from_the_newest_intact_one(run_copy, log):
    config_file, run = run_copy
    os.remove(run / "last_checkpoint")
    os.remove(run / "model_0000001.pth")  # as the checkpointer's max_to_keep would
    os.utime(run / "model_0000000.pth", (1, 1))  # older than model_final.pth
    final = run / "model_final.pth"
    final.write_bytes(final.read_bytes()[:1000])  # damaged: the newest intact is iteration 0
    _main(config_file, run, "--resume")
    assert "resuming from the newest intact checkpoint" in log.text
    assert f"{run / 'model_0000000.pth'}" in log.text
    # iteration 1 trained again, iteration 0 not: the run continued, it did not restart
    logged = [r["iteration"] for r in read_metrics(run) if "total_loss" in r]
    assert logged == [0, 1, 1]
    assert torch.load(final, weights_only=True)["trainer"]["iteration"] == 1


def test_resume_stops_when_no_checkpoint_is_intact(run_copy):
    config_file, run = run_copy
    for name in ("model_0000000.pth", "model_0000001.pth", "model_final.pth"):
        (run / name).write_bytes(b"truncated")
    before = _snapshot(run)
    with pytest.raises(RunDirError, match=f"--resume: none of the checkpoints in {run}"):
        _main(config_file, run, "--resume")
    assert _snapshot(run) == before


def test_resume_with_a_config_that_does_not_fit_writes_nothing(run_copy):
    config_file, run = run_copy
    before = _snapshot(run)
    with pytest.raises(RunDirError) as error:
        _main(config_file, run, "--resume", overrides=["model.num_classes=4"])
    message = str(error.value)
    assert f"Checkpoint {run / 'model_final.pth'} does not fit the model of this config" in message
    assert "tensors of other shapes, e.g. decoder.class_heads.0.weight: [6, 32] in the " in message
    assert "checkpoint, [4, 32] in the model" in message
    assert f"nothing was written to {run}" in message
    assert _snapshot(run) == before  # config.yaml and log.txt as the first run left them


def test_resuming_a_complete_run_evaluates_it_and_changes_no_checkpoint(run_copy, log):
    config_file, run = run_copy
    checkpoints = {k: v for k, v in _snapshot(run).items() if k.endswith(".pth") and "model" in k}
    results = _main(config_file, run, "--resume")
    assert "is complete and nothing is trained" in log.text
    assert 0.0 <= results["bbox"]["AP"] <= 100.0
    after = _snapshot(run)
    assert {k: after[k] for k in checkpoints} == checkpoints
    assert (run / "last_checkpoint").read_text() == "model_final.pth"


def test_eval_only_needs_weights_that_fit_or_random_weights(finished, shapes, tmp_path):
    config_file, run = finished
    out = tmp_path / "eval"
    with pytest.raises(RunDirError, match="--eval-only needs the weights to evaluate.*--random"):
        _main(config_file, out, "--eval-only")
    missing = tmp_path / "missing.pth"
    with pytest.raises(RunDirError, match=f"train.init_checkpoint={missing} does not exist"):
        _main(config_file, out, "--eval-only", overrides=[f"train.init_checkpoint={missing}"])
    # a checkpoint of another encoder: the dense DINO demo model of the same size
    dino = LazyConfig.load(str(CONFIG_DIR / "dino_demo_shapes.py")).model
    other = tmp_path / "dense.pth"
    torch.save({"model": instantiate(shrink_model_config(dino, num_classes=6)).state_dict()}, other)
    with pytest.raises(RunDirError) as error:
        _main(config_file, out, "--eval-only", overrides=[f"train.init_checkpoint={other}"])
    assert f"Checkpoint {other} does not fit the model of this config" in str(error.value)
    assert "23 missing tensors, e.g. ['encoder.selector" in str(error.value)
    assert "--random-weights" in str(error.value)
    assert not out.exists()  # stopped before default_setup wrote anything

    weights = f"train.init_checkpoint={run / 'model_final.pth'}"
    with pytest.raises(RunDirError, match="drop one of them"):
        _main(config_file, out, "--eval-only", "--random-weights", overrides=[weights])
    with pytest.raises(ValueError, match="--random-weights is an option of --eval-only"):
        _main(config_file, out, "--random-weights")
    results = _main(config_file, out, "--eval-only", "--random-weights")
    assert 0.0 <= results["bbox"]["AP"] <= 100.0
    results = _main(config_file, tmp_path / "eval2", "--eval-only", overrides=[weights])
    assert 0.0 <= results["bbox"]["AP"] <= 100.0


def test_eval_only_in_a_run_folder_keeps_its_config(run_copy):
    config_file, run = run_copy
    before = (run / "config.yaml").read_bytes()
    weights = f"train.init_checkpoint={run / 'model_final.pth'}"
    _main(config_file, run, "--eval-only", overrides=[weights, "model.num_select=5"])
    assert (run / "config.yaml").read_bytes() == before
    assert "num_select: 5" in (run / "config_eval.yaml").read_text()
    assert not list(run.glob("config.yaml.kept-*"))
