"""StepTimer on a toy detector and a fake clock: exact section times."""

import pytest
import torch
from torch import nn

from focus_detr.engine import DETRTrainer
from focus_detr.tools import step_timer
from focus_detr.tools.step_timer import StepTimer, section_names


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Part(nn.Module):
    """Advances the clock by ``seconds``, optionally calling ``inner`` halfway."""

    def __init__(self, clock, seconds: float, inner=None):
        super().__init__()
        self.clock, self.seconds, self.inner = clock, seconds, inner
        self.weight = nn.Parameter(torch.ones(()))
        self.weight.register_hook(self._backward)

    def _backward(self, grad):
        self.clock.now += 0.25
        return grad

    def forward(self, x):
        self.clock.now += self.seconds / 2
        if self.inner is not None:
            x = self.inner(x)
        self.clock.now += self.seconds / 2
        return x * self.weight


class _Detector(nn.Module):
    """backbone (1 s), decoder (2 s) calling criterion (4 s), 0.5 s of its own; no neck."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.backbone = _Part(clock, 1.0)
        self.criterion = _Part(clock, 4.0)
        self.decoder = _Part(clock, 2.0, inner=self.criterion)

    def forward(self, batch):
        self.clock.now += 0.5
        return {"loss": self.decoder(self.backbone(batch[0])).sum()}


def test_sections_are_exclusive_and_in_step_order(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(step_timer.time, "perf_counter", clock)
    model = _Detector(clock)
    assert section_names(model, training=False) == ["backbone", "decoder", "forward (other)"]
    assert section_names(model, training=True) == [
        "backbone",
        "decoder",
        "criterion",
        "forward (other)",
        "loss sum + backward",
        "grad clipping + metrics",
        "optimizer step",
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # 8 s in the optimizer step: a post-hook that runs before the timer's (registered first)
    optimizer.register_step_post_hook(lambda *args: setattr(clock, "now", clock.now + 8.0))
    trainer = DETRTrainer(model, [[torch.ones(3)]] * 2, optimizer, clip_grad_max_norm=None)
    timer = StepTimer(model, optimizer=optimizer, trainer=trainer)
    trainer.train(0, 2)
    assert dict(timer.totals) == pytest.approx(
        {
            "backbone": 2.0,
            "decoder": 4.0,  # its own 2 s per step, without the criterion it calls
            "criterion": 8.0,
            "forward (other)": 1.0,
            "loss sum + backward": 1.5,  # 3 x 0.25 s per step in the weights' gradient hooks
            "grad clipping + metrics": 0.0,
            "optimizer step": 16.0,
        }
    )

    timer.reset()
    assert not timer.totals
    timer.remove()
    model({0: torch.ones(3)})
    assert not timer.totals, "hooks still attached after remove()"
