"""NaN or infinite losses: training stops naming the step and a checkpoint, or skips the step."""

import math

import pytest
import torch
from detectron2.utils.events import get_event_storage
from helpers import import_train_net, read_metrics, tiny_train_config

from focus_detr.engine import DETRTrainer, NonFiniteLossError

pytestmark = pytest.mark.usefixtures("single_thread")

train_net = import_train_net()


@pytest.fixture
def poison(monkeypatch):
    """
    ``poison(iterations)``: the model built by do_train returns a NaN ``loss_bbox`` at those
    iterations and, as a NaN forward pass would, leaves NaN in its first buffer (a BatchNorm
    running mean).
    """
    bad = set()
    build = train_net.build_model

    def build_poisoned(cfg):
        model = build(cfg)
        name, buffer = next((n, b) for n, b in model.named_buffers() if n.endswith("running_mean"))

        def hook(module, inputs, losses):
            if module.training and get_event_storage().iter in bad:
                buffer.fill_(float("nan"))
                return dict(losses, loss_bbox=losses["loss_bbox"] * float("nan"))
            return losses

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train_net, "build_model", build_poisoned)
    return bad.update


def _config(tmp_path, shapes, max_iter, **skip):
    cfg = tiny_train_config(tmp_path, shapes.names, max_iter=max_iter)
    cfg.train.checkpointer.period = 2
    if skip:
        cfg.train.skip_nonfinite = skip
    del cfg.dataloader.evaluator
    return cfg


def test_a_nan_loss_stops_training_naming_the_step_and_the_checkpoint(shapes, tmp_path, poison):
    poison({3})
    with pytest.raises(NonFiniteLossError) as error:
        train_net.do_train(_config(tmp_path, shapes, max_iter=6))
    message = str(error.value)
    assert error.value.iteration == 3
    assert "iteration 3" in message and "loss_bbox=nan" in message and "loss_class=" in message
    assert "train.skip_nonfinite.max_consecutive" in message
    checkpoint = tmp_path / "model_0000001.pth"
    assert f"last checkpoint {checkpoint} is intact: --resume" in message
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (tmp_path / "model_final.pth").exists()


def test_skipped_steps_are_counted_and_undone(shapes, tmp_path, poison):
    poison({1, 2, 4})
    train_net.do_train(_config(tmp_path, shapes, max_iter=6, max_consecutive=2))
    records = read_metrics(tmp_path)
    assert [r["iteration"] for r in records if "total_loss" in r] == [0, 3, 5]
    assert max(r.get("skipped_steps", 0) for r in records) == 3
    checkpoint = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert checkpoint["trainer"]["nonfinite"] == {"consecutive": 0, "total": 3}
    # the NaN left in the buffers by the skipped forward passes was put back
    for key, value in checkpoint["model"].items():
        if value.is_floating_point():
            assert value.isfinite().all(), key


def test_too_many_skipped_steps_in_a_row_stop_training(shapes, tmp_path, poison):
    poison({1, 2, 3})
    with pytest.raises(NonFiniteLossError, match="iteration 3.*2 steps before it were skipped"):
        train_net.do_train(_config(tmp_path, shapes, max_iter=6, max_consecutive=2))


class _NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, batch):
        return {"loss_toy": _NaNGradient.apply(self.linear(batch)).abs().sum()}


def test_a_nan_gradient_with_a_finite_loss_stops_training_too():
    model = _Toy()
    before = model.linear.weight.detach().clone()
    trainer = DETRTrainer(model, [torch.ones(1, 2)], torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(NonFiniteLossError, match=r"gradient norm .* iteration 0: grad_norm=nan"):
        trainer.train(0, 1)
    assert torch.equal(model.linear.weight, before)
    assert math.isfinite(float(model(torch.ones(1, 2))["loss_toy"]))
