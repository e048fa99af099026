"""
Exact resume and two-process CPU data parallelism of the training engine (focus_detr.engine and
train_net.py), on a tiny model and a tiny synthetic shapes dataset.
"""

import datetime

import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig
from detectron2.engine import launch
from detectron2.utils.env import seed_all_rng
from fvcore.common.param_scheduler import CosineParamScheduler
from helpers import TEST_EMA, import_train_net, read_metrics, tiny_train_config, train_net_worker

from focus_detr.engine import DETRTrainer

pytestmark = pytest.mark.usefixtures("single_thread")

train_net = import_train_net()


class _Interrupted(Exception):
    pass


def test_resume_continues_iterations_schedule_random_streams_and_losses(
    shapes, tmp_path, monkeypatch
):
    """
    Run 4 iterations; run 2, interrupt, resume to 4. The resumed iterations must reproduce the
    uninterrupted ones exactly: iteration counter, LR (a cosine schedule, so every iteration has
    its own LR), data order (with aspect-ratio grouping, whose buckets hold images back across
    the checkpoint), augmentation (random flips, drawn in two loader workers) and denoising
    noise all continue. (A real SIGKILL of train_net.py: test_kill_and_resume.py.)
    """
    first, total = 2, 4
    records = {}
    stop_at = [None]
    run_step = DETRTrainer.run_step

    def recording_run_step(self):
        if self.iter == stop_at[0]:
            raise _Interrupted()
        lr = self.optimizer.param_groups[0]["lr"]
        run_step(self)
        latest = self.storage.latest()
        records[self.iter] = {"lr": lr}
        records[self.iter].update(
            {k: v for k, (v, it) in latest.items() if "loss" in k and it == self.iter}
        )

    monkeypatch.setattr(DETRTrainer, "run_step", recording_run_step)

    def config(output_dir):
        cfg = tiny_train_config(output_dir, shapes.names, max_iter=total, flip=True)
        cfg.dataloader.train.num_workers = 2
        cfg.dataloader.train.aspect_ratio_grouping = True
        cfg.lr_multiplier.scheduler = L(CosineParamScheduler)(start_value=1.0, end_value=0.1)
        cfg.train.checkpointer.period = first
        cfg.train.ema = dict(TEST_EMA)
        del cfg.dataloader.evaluator  # no evaluation
        return cfg

    seed_all_rng(0)
    train_net.do_train(config(tmp_path / "uninterrupted"))
    uninterrupted = dict(records)
    assert sorted(uninterrupted) == [0, 1, 2, 3]

    records.clear()
    seed_all_rng(0)
    stop_at[0] = first
    with pytest.raises(_Interrupted):
        train_net.do_train(config(tmp_path / "resumed"))
    assert sorted(records) == [0, 1]
    with open(tmp_path / "resumed" / "last_checkpoint") as f:
        assert f.read().strip() == "model_0000001.pth"

    records.clear()
    seed_all_rng(1234)  # resuming must not depend on the random state it starts with
    stop_at[0] = None
    train_net.do_train(config(tmp_path / "resumed"), resume=True)
    assert sorted(records) == [2, 3]
    assert records[2]["lr"] != uninterrupted[0]["lr"]
    for iteration in (2, 3):
        assert set(records[iteration]) == set(uninterrupted[iteration])
        for key, value in records[iteration].items():
            assert value == pytest.approx(uninterrupted[iteration][key], rel=1e-5), (iteration, key)

    logged = [r["iteration"] for r in read_metrics(tmp_path / "resumed") if "total_loss" in r]
    assert logged == [0, 1, 2, 3]
    final = {}
    for name in ("uninterrupted", "resumed"):
        final[name] = torch.load(tmp_path / name / "model_final.pth", weights_only=True)
        assert final[name]["trainer"]["iteration"] == total - 1
    for weights in ("model", "ema"):
        expected = final["uninterrupted"][weights]
        for key, value in expected.get("model", expected).items():
            got = final["resumed"][weights]
            torch.testing.assert_close(got.get("model", got)[key], value, msg=(weights, key))
    assert final["resumed"]["ema"]["updates"] == total


def test_two_processes_data_parallel_on_cpu(shapes, tmp_path):
    output_dir = tmp_path / "ddp"
    config_file = tmp_path / "config.yaml"
    LazyConfig.save(tiny_train_config(output_dir, shapes.names, max_iter=2), str(config_file))
    argv = ["--config-file", str(config_file), "--num-gpus", "2"]
    launch(
        train_net_worker,
        2,
        dist_url="auto",
        args=(shapes.root, shapes.prefix, argv),
        timeout=datetime.timedelta(minutes=1),
    )
    ranks = [torch.load(output_dir / f"rank{r}.pth", weights_only=True) for r in (0, 1)]
    assert [(s["rank"], s["world_size"]) for s in ranks] == [(0, 2), (1, 2)]
    # Gradients are averaged across the processes: their parameters stay identical. (Buffers
    # need not: the demo backbone's BatchNorm statistics are per process.)
    checkpoint = torch.load(output_dir / "model_final.pth", weights_only=True)
    for key, value in ranks[0]["parameters"].items():
        assert torch.equal(ranks[1]["parameters"][key], value), key
        assert torch.equal(checkpoint["model"][key], value), key
    assert checkpoint["trainer"]["iteration"] == 1
    logged = [r for r in read_metrics(output_dir) if "total_loss" in r]
    assert [r["iteration"] for r in logged] == [0, 1]
    assert (output_dir / "config.yaml").exists()
