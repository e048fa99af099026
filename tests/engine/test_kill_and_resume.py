"""
A real ``train_net.py`` run of the demo config as shipped (its loader worker, aspect-ratio
grouping, random flips, denoising), killed with SIGKILL after a checkpoint and resumed with
``--resume``, ends with the weights of an uninterrupted run: in one process and in two (gloo).

Only the dataset is swapped for the tiny one of the ``shapes`` fixture (registered by a config
file that loads the demo config), and the batch and run are short.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import DEMO_CONFIG, REPO_ROOT

pytestmark = pytest.mark.slow

MAX_ITER = 8
PERIOD = 3  # checkpoints after iterations 2 and 5
KILL_AFTER = 5  # iteration 5 logged: model_0000005.pth is written, iterations 6 and 7 are not

_CONFIG = """
from detectron2.config import LazyConfig

from focus_detr.data import register_synthetic_shapes

_names = register_synthetic_shapes(
    {root!r}, num_train=4, num_val=2, seed=0, min_size=64, max_size=96, max_objects=3,
    empty_fraction=0.0, name_prefix={prefix!r},
)
_demo = LazyConfig.load({demo!r})
dataloader = _demo.dataloader
model = _demo.model
optimizer = _demo.optimizer
lr_multiplier = _demo.lr_multiplier
train = _demo.train
dataloader.train.dataset.names = _names["train"]
dataloader.test.dataset.names = _names["val"]
del dataloader.evaluator  # no final evaluation: the weights are compared
"""


def _command(config_file, output_dir, num_processes, resume=False):
    command = [sys.executable, str(REPO_ROOT / "train_net.py"), "--config-file", str(config_file)]
    command += ["--num-gpus", str(num_processes)] + (["--resume"] if resume else [])
    return command + [
        f"train.output_dir={output_dir}",
        f"train.max_iter={MAX_ITER}",
        f"train.checkpointer.period={PERIOD}",
        "train.amp.enabled=False",
        "train.seed=0",
        "train.log_period=1",
        "train.eval_period=0",
        "train.device=cpu",
        "dataloader.train.total_batch_size=4",
        # a loader worker process, whose random streams a resumed run must reproduce
        "dataloader.train.num_workers=1",
    ]


def _logged_iterations(output_dir):
    iterations = []
    try:
        with open(output_dir / "metrics.json") as f:
            for line in f:
                try:
                    iterations.append(json.loads(line)["iteration"])
                except (ValueError, KeyError):
                    pass  # a line being written
    except FileNotFoundError:
        pass
    return iterations


def _run(command, env, log):
    with open(log, "a") as out:
        result = subprocess.run(command, env=env, stdout=out, stderr=out, timeout=600)
    assert result.returncode == 0, log.read_text()[-3000:]


def _run_and_kill(command, env, output_dir, log):
    """Start ``command`` in its own process group; SIGKILL the group after KILL_AFTER."""
    with open(log, "a") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=out, start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while max(_logged_iterations(output_dir), default=-1) < KILL_AFTER:
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the run did not reach the kill point"
                time.sleep(0.05)
            os.killpg(process.pid, signal.SIGKILL)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


@pytest.mark.parametrize("num_processes", [1, 2])
def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_weights(
    shapes, tmp_path, num_processes
):
    config_file = tmp_path / "demo_on_tiny_shapes.py"
    config_file.write_text(
        _CONFIG.format(root=shapes.root, prefix=shapes.prefix, demo=str(DEMO_CONFIG))
    )
    # one intra-op thread: OpenMP threads spinning against the loader worker (and the other
    # process) made steps ten times slower on a 2-core machine
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    log = tmp_path / "log.txt"

    uninterrupted = tmp_path / "uninterrupted"
    _run(_command(config_file, uninterrupted, num_processes), env, log)

    resumed = tmp_path / "resumed"
    _run_and_kill(_command(config_file, resumed, num_processes), env, resumed, log)
    assert not (resumed / "model_final.pth").exists(), "killed too late"
    assert (resumed / "last_checkpoint").read_text() == f"model_{KILL_AFTER:07d}.pth"
    _run(_command(config_file, resumed, num_processes, resume=True), env, log)
    assert f"Starting training from iteration {KILL_AFTER + 1}" in log.read_text()

    final = {
        name: torch.load(folder / "model_final.pth", weights_only=True)
        for name, folder in (("uninterrupted", uninterrupted), ("resumed", resumed))
    }
    assert final["resumed"]["trainer"]["iteration"] == MAX_ITER - 1
    expected, got = final["uninterrupted"]["model"], final["resumed"]["model"]
    assert set(got) == set(expected)
    differences = {
        key: float((got[key].double() - value.double()).abs().max())
        for key, value in expected.items()
        if not torch.equal(got[key], value)
    }
    assert not differences, differences
    # and the optimizer state the run would continue with
    for key, state in final["uninterrupted"]["trainer"]["optimizer"]["state"].items():
        for name, value in state.items():
            other = final["resumed"]["trainer"]["optimizer"]["state"][key][name]
            assert torch.equal(torch.as_tensor(other), torch.as_tensor(value)), (key, name)
