"""
End-to-end tests of the training engine (focus_detr.engine and train_net.py) on a tiny model and a
tiny synthetic shapes dataset: outputs, checkpoints, EMA, AMP, gradient clipping and
evaluation-only runs (exact resume and data parallelism: test_resume_and_parallel.py).
"""

import math
import os
import subprocess
import sys
import types

import pytest
import torch
from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog
from detectron2.engine import default_argument_parser
from detectron2.utils.env import seed_all_rng
from helpers import (
    REPO_ROOT,
    TEST_EMA,
    build_tiny_model,
    import_train_net,
    make_batched_inputs,
    read_metrics,
    tiny_train_config,
)

from focus_detr.engine import DETRTrainer, InferenceError, build_model, load_for_eval

pytestmark = pytest.mark.usefixtures("single_thread")

train_net = import_train_net()


def _ema_config(output_dir, shapes, **kwargs):
    cfg = tiny_train_config(output_dir, shapes.names, **kwargs)
    cfg.train.ema = dict(TEST_EMA)
    return cfg


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shapes):
    """Two iterations of do_train with EMA, then the final evaluation (with the EMA weights)."""
    output_dir = tmp_path_factory.mktemp("trained")
    seed_all_rng(0)
    results = train_net.do_train(_ema_config(output_dir, shapes, max_iter=2))
    return types.SimpleNamespace(output_dir=output_dir, results=results)


def test_do_train_evaluates_and_writes_metrics_events_and_checkpoints(trained_run):
    bbox = trained_run.results["bbox"]
    assert {"AP", "AP50", "AP75"} <= set(bbox)
    assert all(0.0 <= bbox[key] <= 100.0 for key in ("AP", "AP50", "AP75"))

    records = read_metrics(trained_run.output_dir)
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
    assert "LRScheduler" in trainer["hooks"]
    assert "optimizer" in trainer and trainer["seed"] == 0
    assert trainer["nonfinite"] == {"consecutive": 0, "total": 0}
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


def test_an_image_the_model_cannot_take_fails_the_evaluation_naming_it(
    shapes, tmp_path, monkeypatch
):
    cfg = tiny_train_config(tmp_path, shapes.names)
    model = build_model(cfg)
    # a backbone padding to a fixed square (ViT-style) smaller than the test images (64)
    monkeypatch.setattr(
        type(model.backbone), "padding_constraints", property(lambda self: {"square_size": 48})
    )
    first = DatasetCatalog.get(shapes.names["val"])[0]["file_name"]
    with pytest.raises(InferenceError, match=f"The model failed on {first}: ValueError: .*48"):
        train_net.do_test(cfg, model)


def test_ema_starts_from_the_initial_checkpoint(trained_run, shapes, tmp_path):
    initial = os.path.join(trained_run.output_dir, "model_final.pth")
    cfg = _ema_config(tmp_path, shapes, max_iter=1)
    cfg.train.init_checkpoint = initial
    del cfg.dataloader.evaluator
    train_net.do_train(cfg)
    before = torch.load(initial, weights_only=True)["model"]
    checkpoint = torch.load(tmp_path / "model_final.pth", weights_only=True)
    after, ema = checkpoint["model"], checkpoint["ema"]["model"]
    # one update with decay 0.5 from the loaded weights (not from the random initialization)
    decay = TEST_EMA["decay"]
    for key, value in ema.items():
        if value.is_floating_point():
            expected = decay * before[key] + (1 - decay) * after[key]
            torch.testing.assert_close(value, expected, msg=key)


def test_amp_bfloat16_on_cpu(shapes, tmp_path, monkeypatch):
    dtypes = []
    build = train_net.build_model

    def build_with_probe(cfg):
        model = build(cfg)
        model.query_selection.class_head.register_forward_hook(
            lambda module, inputs, output: dtypes.append(output.dtype)
        )
        return model

    monkeypatch.setattr(train_net, "build_model", build_with_probe)
    cfg = tiny_train_config(tmp_path, shapes.names, max_iter=2)
    cfg.train.amp.enabled = True
    del cfg.dataloader.evaluator
    train_net.do_train(cfg)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    losses = [r for r in read_metrics(tmp_path) if "total_loss" in r]
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
    # float64: a float32 sum of squares over the 11 M parameters is off by about 0.1%
    update = torch.cat([(p.detach() - b).double().flatten() for p, b in zip(parameters, before)])
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
