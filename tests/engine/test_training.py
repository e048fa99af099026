"""
End-to-end tests of the training engine (focus_detr.engine and train_net.py) on a tiny model and a
tiny synthetic shapes dataset: outputs, checkpoints, exact resume, EMA, AMP, gradient clipping,
two-process data parallelism and evaluation-only runs.
"""

import datetime
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig
from detectron2.engine import default_argument_parser, launch
from detectron2.utils.env import seed_all_rng
from fvcore.common.param_scheduler import CosineParamScheduler
from helpers import (
    REPO_ROOT,
    build_tiny_model,
    import_train_net,
    make_batched_inputs,
    register_tiny_shapes,
    tiny_train_config,
    train_net_worker,
)

from focus_detr.engine import DETRTrainer, build_model, do_train, load_for_eval, train_loop

pytestmark = pytest.mark.usefixtures("single_thread")

EMA = dict(enabled=True, decay=0.5, warmup=0)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A 4 + 2 image synthetic dataset (64..96 pixels) registered under a unique name."""
    root = str(tmp_path_factory.mktemp("shapes"))
    prefix = f"test_training_{os.getpid()}"
    return types.SimpleNamespace(root=root, prefix=prefix, names=register_tiny_shapes(root, prefix))


def _ema_config(output_dir, shapes, **kwargs):
    cfg = tiny_train_config(output_dir, shapes.names, **kwargs)
    cfg.train.ema = dict(EMA)
    return cfg


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shapes):
    """Two iterations of do_train with EMA, then the final evaluation (with the EMA weights)."""
    output_dir = tmp_path_factory.mktemp("trained")
    seed_all_rng(0)
    results = do_train(_ema_config(output_dir, shapes, max_iter=2))
    return types.SimpleNamespace(output_dir=output_dir, results=results)


def _metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def test_do_train_evaluates_and_writes_metrics_events_and_checkpoints(trained_run):
    bbox = trained_run.results["bbox"]
    assert {"AP", "AP50", "AP75"} <= set(bbox)
    assert all(0.0 <= bbox[key] <= 100.0 for key in ("AP", "AP50", "AP75"))

    records = _metrics(trained_run.output_dir)
    losses = [r for r in records if "total_loss" in r]
    assert [r["iteration"] for r in losses] == [0, 1]
    for record in losses:
        for key in ("total_loss", "loss_class", "loss_foreground", "grad_norm", "lr"):
            assert math.isfinite(record[key]), (key, record)
    assert any("bbox/AP" in r for r in records), "the evaluation results were not logged"

    names = os.listdir(trained_run.output_dir)
    assert any(n.startswith("events.out.tfevents.") for n in names), names
    with open(os.path.join(trained_run.output_dir, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"
    assert "model_0000001.pth" in names

    # Loadable without unpickling arbitrary objects (torch.load's default since PyTorch 2.6).
    checkpoint = torch.load(
        os.path.join(trained_run.output_dir, "model_final.pth"), weights_only=True
    )
    assert {"model", "trainer", "ema"} <= set(checkpoint)
    trainer = checkpoint["trainer"]
    assert trainer["iteration"] == 1
    assert {"LRScheduler", "RNGStateHook"} <= set(trainer["hooks"])
    assert "optimizer" in trainer and trainer["data_seed"] == 0
    assert checkpoint["ema"]["updates"] == 2


def test_load_for_eval_loads_the_ema_weights(trained_run, shapes):
    path = os.path.join(trained_run.output_dir, "model_final.pth")
    checkpoint = torch.load(path, weights_only=True)
    raw, ema = checkpoint["model"], checkpoint["ema"]["model"]
    assert any(not torch.equal(raw[k], ema[k]) for k in raw), "EMA equals the raw weights"

    cfg = _ema_config(trained_run.output_dir, shapes)
    model = build_model(cfg)
    load_for_eval(cfg, model, path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, ema[key]), key

    cfg.train.ema.enabled = False
    load_for_eval(cfg, model, path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, raw[key]), key


def test_eval_only_with_init_checkpoint_through_train_net(trained_run, shapes, tmp_path):
    train_net = import_train_net()
    config_file = tmp_path / "config.yaml"
    LazyConfig.save(_ema_config(tmp_path / "unused", shapes), str(config_file))
    checkpoint = os.path.join(trained_run.output_dir, "model_final.pth")
    output_dir = tmp_path / "eval"
    args = default_argument_parser().parse_args(
        [
            "--config-file",
            str(config_file),
            "--eval-only",
            f"train.init_checkpoint={checkpoint}",
            f"train.output_dir={output_dir}",
        ]
    )
    results = train_net.main(args)

    # default_setup saved the config with the command line overrides
    saved = LazyConfig.load(str(output_dir / "config.yaml"))
    assert saved.train.init_checkpoint == checkpoint
    # Same (EMA) weights, same images: the predictions of the training run's final evaluation.
    expected = torch.load(os.path.join(trained_run.output_dir, "instances_predictions.pth"))
    predictions = torch.load(output_dir / "instances_predictions.pth")
    assert len(predictions) == len(expected) == 2
    for got, want in zip(predictions, expected):
        assert got["image_id"] == want["image_id"]
        assert len(got["instances"]) == len(want["instances"]) > 0
        for a, b in zip(got["instances"], want["instances"]):
            assert a["category_id"] == b["category_id"]
            assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
    assert results["bbox"]["AP"] == pytest.approx(trained_run.results["bbox"]["AP"])


class _Interrupted(Exception):
    pass


def test_resume_continues_iterations_schedule_random_streams_and_losses(
    shapes, tmp_path, monkeypatch
):
    """
    Run 4 iterations; run 2, interrupt, resume to 4. The resumed iterations must reproduce the
    uninterrupted ones exactly: iteration counter, LR (a cosine schedule, so every iteration has
    its own LR), data order (sampler started after the samples already seen), augmentation
    (random flips: NumPy state) and denoising noise (torch state) all continue. This needs no
    loader workers (their random states are not checkpointed) and no aspect-ratio grouping
    (its buckets may hold images of the next batch, which a checkpoint does not keep).
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
        cfg.lr_multiplier.scheduler = L(CosineParamScheduler)(start_value=1.0, end_value=0.1)
        cfg.train.checkpointer.period = first
        cfg.train.ema = dict(EMA)
        del cfg.dataloader.evaluator  # no evaluation
        return cfg

    seed_all_rng(0)
    do_train(config(tmp_path / "uninterrupted"))
    uninterrupted = dict(records)
    assert sorted(uninterrupted) == [0, 1, 2, 3]

    records.clear()
    seed_all_rng(0)
    stop_at[0] = first
    with pytest.raises(_Interrupted):
        do_train(config(tmp_path / "resumed"))
    assert sorted(records) == [0, 1]
    with open(tmp_path / "resumed" / "last_checkpoint") as f:
        assert f.read().strip() == "model_0000001.pth"

    records.clear()
    seed_all_rng(1234)  # resuming must not depend on the random state it starts with
    stop_at[0] = None
    do_train(config(tmp_path / "resumed"), resume=True)
    assert sorted(records) == [2, 3]
    assert records[2]["lr"] != uninterrupted[0]["lr"]
    for iteration in (2, 3):
        assert set(records[iteration]) == set(uninterrupted[iteration])
        for key, value in records[iteration].items():
            assert value == pytest.approx(uninterrupted[iteration][key], rel=1e-5), (iteration, key)

    logged = [r["iteration"] for r in _metrics(tmp_path / "resumed") if "total_loss" in r]
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


def test_ema_starts_from_the_initial_checkpoint(trained_run, shapes, tmp_path):
    initial = os.path.join(trained_run.output_dir, "model_final.pth")
    cfg = _ema_config(tmp_path, shapes, max_iter=1)
    cfg.train.init_checkpoint = initial
    del cfg.dataloader.evaluator
    do_train(cfg)
    before = torch.load(initial, weights_only=True)["model"]
    checkpoint = torch.load(tmp_path / "model_final.pth", weights_only=True)
    after, ema = checkpoint["model"], checkpoint["ema"]["model"]
    # one update with decay 0.5 from the loaded weights (not from the random initialization)
    decay = EMA["decay"]
    for key, value in ema.items():
        if value.is_floating_point():
            expected = decay * before[key] + (1 - decay) * after[key]
            torch.testing.assert_close(value, expected, msg=key)


def test_amp_bfloat16_on_cpu(shapes, tmp_path, monkeypatch):
    dtypes = []
    build = train_loop.build_model

    def build_with_probe(cfg):
        model = build(cfg)
        model.query_selection.class_head.register_forward_hook(
            lambda module, inputs, output: dtypes.append(output.dtype)
        )
        return model

    monkeypatch.setattr(train_loop, "build_model", build_with_probe)
    cfg = tiny_train_config(tmp_path, shapes.names, max_iter=2)
    cfg.train.amp.enabled = True
    del cfg.dataloader.evaluator
    do_train(cfg)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    losses = [r for r in _metrics(tmp_path) if "total_loss" in r]
    assert [r["iteration"] for r in losses] == [0, 1]
    assert all(math.isfinite(r[k]) for r in losses for k in r if "loss" in k)
    weights = torch.load(tmp_path / "model_final.pth", weights_only=True)["model"]
    assert all(v.dtype != torch.bfloat16 for v in weights.values())
    assert all(v.isfinite().all() for v in weights.values() if v.is_floating_point())


def _one_sgd_step(clip_grad_max_norm):
    """One DETRTrainer step with SGD(lr=1): the update is minus the (clipped) gradient."""
    model = build_tiny_model().train()
    inputs = make_batched_inputs([(64, 64), (64, 80)], [[[4, 6, 40, 50]], [[10, 12, 70, 60]]])
    parameters = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in parameters]
    trainer = DETRTrainer(
        model,
        [inputs],
        torch.optim.SGD(parameters, lr=1.0),
        clip_grad_max_norm=clip_grad_max_norm,
    )
    torch.manual_seed(0)  # same denoising noise in both runs
    trainer.train(0, 1)
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(parameters, before)])
    return float(update.norm()), trainer.storage


def test_gradient_clipping_bounds_the_update_and_logs_the_norm():
    max_norm = 0.01
    clipped_update, storage = _one_sgd_step(max_norm)
    grad_norm = storage.history("grad_norm").latest()
    assert grad_norm > 10 * max_norm, "the gradient is too small for this test"
    assert clipped_update == pytest.approx(max_norm, rel=1e-2)

    # without clipping the update is the whole gradient, whose norm was logged above
    unclipped_update, storage = _one_sgd_step(None)
    assert unclipped_update == pytest.approx(grad_norm, rel=1e-3)
    assert "grad_norm" not in storage.histories()


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
    logged = [r for r in _metrics(output_dir) if "total_loss" in r]
    assert [r["iteration"] for r in logged] == [0, 1]
    assert (output_dir / "config.yaml").exists()


def test_train_net_help():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train_net.py"), "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for option in ("--config-file", "--eval-only", "--resume", "--num-gpus"):
        assert option in result.stdout
