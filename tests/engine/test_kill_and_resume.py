"""
A real ``train_net.py`` run of the demo config as shipped (its loader worker, aspect-ratio
grouping, random flips, denoising), killed with SIGKILL after a checkpoint, or stopped with
SIGTERM or SIGINT (which save a checkpoint of the current iteration, even though the demo config
checkpoints only at its last iteration), and resumed with ``--resume``, ends with the weights of
an uninterrupted run: in one process and in two (gloo).

Only the dataset is swapped for the tiny one of the ``shapes`` fixture (registered by a config
file that loads the demo config), and the batch and run are short.
"""

import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
from helpers import DEMO_CONFIG, REPO_ROOT

pytestmark = pytest.mark.slow

MAX_ITER = 8
PERIOD = 3  # checkpoints after iterations 2 and 5
KILL_AFTER = 5  # iteration 5 logged: model_0000005.pth is written, iterations 6 and 7 are not
SIGNAL_AFTER = 2  # iteration 2 logged: the run stops after iteration 2 at the earliest, before 7

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


def _command(config_file, output_dir, num_processes, resume=False, period=PERIOD):
    """``period=None``: the demo config's own (a checkpoint at the last iteration only)."""
    command = [sys.executable, str(REPO_ROOT / "train_net.py"), "--config-file", str(config_file)]
    command += ["--num-gpus", str(num_processes)] + (["--resume"] if resume else [])
    if period is not None:
        command.append(f"train.checkpointer.period={period}")
    return command + [
        f"train.output_dir={output_dir}",
        f"train.max_iter={MAX_ITER}",
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


def _run_and_signal(command, env, output_dir, log, signum, *, whole_group, after):
    """
    Start ``command``; once iteration ``after`` is logged, send ``signum`` to the process itself
    (``kill PID``: with several training processes, the launcher, which passes it on) or to its
    whole process group (Ctrl-C in a terminal, or a scheduler stopping a job: launcher, training
    processes and loader workers). Returns the exit status.
    """
    with open(log, "a") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=out, start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while max(_logged_iterations(output_dir), default=-1) < after:
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, f"the run did not reach iteration {after}"
                time.sleep(0.05)
            (os.killpg if whole_group else os.kill)(process.pid, signum)
            process.wait(timeout=300)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=60)
    return process.returncode


def _run_and_kill(command, env, output_dir, log):
    """Start ``command`` in its own process group; SIGKILL the group after KILL_AFTER."""
    status = _run_and_signal(
        command, env, output_dir, log, signal.SIGKILL, whole_group=True, after=KILL_AFTER
    )
    assert status == -signal.SIGKILL


_UNINTERRUPTED = {}


@pytest.fixture
def run(shapes, tmp_path_factory):
    """Runs of the demo config on the tiny dataset; ``run.uninterrupted(n)`` is made once."""
    folder = tmp_path_factory.mktemp("runs")
    config_file = folder / "demo_on_tiny_shapes.py"
    config_file.write_text(
        _CONFIG.format(root=shapes.root, prefix=shapes.prefix, demo=str(DEMO_CONFIG))
    )
    # one intra-op thread: OpenMP threads spinning against the loader worker (and the other
    # process) made steps ten times slower on a 2-core machine
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")

    def uninterrupted(num_processes):
        if num_processes not in _UNINTERRUPTED:
            output_dir = tmp_path_factory.mktemp(f"uninterrupted{num_processes}")
            _run(_command(config_file, output_dir, num_processes), env, folder / "log.txt")
            _UNINTERRUPTED[num_processes] = output_dir
        return _UNINTERRUPTED[num_processes]

    return types.SimpleNamespace(
        config_file=config_file, env=env, uninterrupted=uninterrupted, log=folder / "log.txt"
    )


def _assert_same_final_state(uninterrupted, resumed):
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


@pytest.mark.parametrize("num_processes", [1, 2])
def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_weights(
    run, tmp_path, num_processes
):
    resumed = tmp_path / "resumed"
    command = _command(run.config_file, resumed, num_processes)
    _run_and_kill(command, run.env, resumed, run.log)
    assert not (resumed / "model_final.pth").exists(), "killed too late"
    assert (resumed / "last_checkpoint").read_text() == f"model_{KILL_AFTER:07d}.pth"
    _run(_command(run.config_file, resumed, num_processes, resume=True), run.env, run.log)
    assert f"Starting training from iteration {KILL_AFTER + 1}" in run.log.read_text()
    _assert_same_final_state(run.uninterrupted(num_processes), resumed)


@pytest.mark.parametrize("num_processes", [1, 2])
@pytest.mark.parametrize(
    "signum, whole_group",
    [(signal.SIGTERM, False), (signal.SIGINT, True), (signal.SIGTERM, True)],
    ids=["TERM-pid", "INT-group", "TERM-group"],  # kill PID, Ctrl-C, a scheduler (all processes)
)
def test_a_run_stopped_by_a_signal_saves_its_iteration_and_resumes_to_the_same_weights(
    run, tmp_path, num_processes, signum, whole_group
):
    resumed = tmp_path / "resumed"
    # the demo config's own checkpoint period: no checkpoint before the last iteration
    command = _command(run.config_file, resumed, num_processes, period=None)
    status = _run_and_signal(
        command, run.env, resumed, run.log, signum, whole_group=whole_group, after=SIGNAL_AFTER
    )
    log = run.log.read_text()
    assert status == 128 + signum, log[-3000:]
    assert not (resumed / "model_final.pth").exists(), "stopped too late"
    saved = (resumed / "last_checkpoint").read_text()
    iteration = int(saved[len("model_") : -len(".pth")])
    assert SIGNAL_AFTER <= iteration < MAX_ITER - 1  # the writers log before it is saved
    assert sorted(p.name for p in resumed.glob("model_*.pth")) == [saved]
    name = signal.Signals(signum).name
    assert f"Training stopped by {name} after iteration {iteration}: " in log
    assert f"Run the same command with --resume to continue from iteration {iteration + 1}" in log

    _run(_command(run.config_file, resumed, num_processes, True, period=None), run.env, run.log)
    assert f"Starting training from iteration {iteration + 1}" in run.log.read_text()
    _assert_same_final_state(run.uninterrupted(num_processes), resumed)
