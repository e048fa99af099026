"""
BoundedHistoryHook: the EventStorage keeps a bounded number of values without changing what
detectron2's writers read (latest value, windowed medians, the ETA's median, global averages).
"""

import pytest
from detectron2.engine import HookBase, TrainerBase
from detectron2.utils.events import EventStorage

from focus_detr.engine.hooks import BoundedHistoryHook


class _PutScalars(HookBase):
    """Stands in for a training step: two scalars per step, values that change every step."""

    def after_step(self) -> None:
        i = self.trainer.iter
        self.trainer.storage.put_scalars(loss=float(i % 7), time=0.5 + 0.001 * (i % 13))


class _Trainer(TrainerBase):
    def run_step(self) -> None:
        pass


def _train(iterations, hooks):
    trainer = _Trainer()
    trainer.register_hooks(hooks)
    trainer.train(0, iterations)
    return trainer.storage


def test_histories_stop_growing_and_logged_numbers_are_unchanged():
    bounded = _train(2500, [_PutScalars(), BoundedHistoryHook(max_length=1000)])
    full = _train(2500, [_PutScalars()])
    for name in ("loss", "time"):
        kept, every = bounded.history(name), full.history(name)
        assert len(every.values()) == 2500 and len(kept.values()) == 1000
        assert kept.values() == every.values()[-1000:]
        assert kept.latest() == every.latest()
        assert kept.global_avg() == pytest.approx(every.global_avg(), rel=0, abs=0)
        assert kept.median(20) == every.median(20) and kept.median(1000) == every.median(1000)


def test_the_bound_must_cover_the_eta_window():
    with pytest.raises(ValueError, match="got 999"):
        BoundedHistoryHook(max_length=999)
    # the default keeps 1000 values, the ETA's window
    storage = _train(1100, [_PutScalars(), BoundedHistoryHook()])
    assert len(storage.history("loss").values()) == 1000
    assert isinstance(storage, EventStorage)
