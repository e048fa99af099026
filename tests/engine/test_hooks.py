"""
BoundedHistoryHook: the EventStorage keeps a bounded number of values without changing what
detectron2's writers read (latest value, windowed medians, the ETA's median, global averages).
AllocatorPurgeHook: when it changes jemalloc's decay and purges (allocator calls recorded).
"""

import pytest
from detectron2.engine import HookBase, TrainerBase
from detectron2.utils.events import EventStorage

from focus_detr.engine import hooks as hooks_module
from focus_detr.engine.hooks import AllocatorPurgeHook, BoundedHistoryHook


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


@pytest.fixture
def allocator_calls(monkeypatch):
    """jemalloc as if loaded with decay (10000, 0) ms; every call recorded."""
    calls = []
    monkeypatch.setattr(hooks_module, "jemalloc_default_decay", lambda: (10000, 0))
    monkeypatch.setattr(
        hooks_module, "jemalloc_set_decay", lambda *ms: calls.append(("decay",) + ms) or True
    )
    monkeypatch.setattr(hooks_module, "jemalloc_purge", lambda: calls.append(("purge",)) or True)
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    return calls


class _RecordIteration(HookBase):
    def __init__(self, calls):
        self.calls = calls

    def after_step(self) -> None:
        self.calls.append(("step", self.trainer.iter))


@pytest.mark.parametrize("start", [0, 7])
def test_decay_goes_off_after_the_first_step_and_everything_is_purged_every_period(
    allocator_calls, start
):
    trainer = _Trainer()
    trainer.register_hooks([_RecordIteration(allocator_calls), AllocatorPurgeHook(period=5)])
    trainer.train(start, 17)
    steps = [call for call in allocator_calls if call[0] == "step"]
    assert steps[0] == ("step", start)
    # off after the first step (the loader's workers have started), back after training
    assert allocator_calls[1] == ("decay", -1, -1)
    assert allocator_calls[-1] == ("decay", 10000, 0)
    purged_after = [
        allocator_calls[i - 1][1] for i, call in enumerate(allocator_calls) if call == ("purge",)
    ]
    assert purged_after == [i for i in range(start, 17) if (i + 1) % 5 == 0]


def test_a_decay_set_in_malloc_conf_or_no_jemalloc_leaves_the_allocator_alone(
    allocator_calls, monkeypatch
):
    monkeypatch.setenv("MALLOC_CONF", "dirty_decay_ms:1000")
    _train(12, [AllocatorPurgeHook(period=5)])
    assert allocator_calls == []
    monkeypatch.setenv("MALLOC_CONF", "narenas:2")  # other options: the policy applies
    _train(12, [AllocatorPurgeHook(period=5)])
    assert allocator_calls == [("decay", -1, -1), ("purge",), ("purge",), ("decay", 10000, 0)]
    allocator_calls.clear()
    monkeypatch.delenv("MALLOC_CONF")
    monkeypatch.setattr(hooks_module, "jemalloc_default_decay", lambda: None)
    _train(12, [AllocatorPurgeHook(period=5)])
    assert allocator_calls == []


def test_a_refused_jemalloc_control_turns_the_policy_off_instead_of_stopping_training(
    allocator_calls, monkeypatch
):
    def refuse():
        raise OSError(2, "jemalloc mallctl('opt.dirty_decay_ms') failed with status 2")

    monkeypatch.setattr(hooks_module, "jemalloc_default_decay", refuse)
    _train(12, [AllocatorPurgeHook(period=5)])  # a jemalloc 4: no decay control
    assert allocator_calls == []

    monkeypatch.setattr(hooks_module, "jemalloc_default_decay", lambda: (10000, 0))
    monkeypatch.setattr(hooks_module, "jemalloc_purge", refuse)
    _train(12, [AllocatorPurgeHook(period=5)])
    # the first purge fails: jemalloc's own decay comes back and nothing more is tried
    assert allocator_calls == [("decay", -1, -1), ("decay", 10000, 0)]


def test_the_purge_period_must_be_positive():
    with pytest.raises(ValueError, match="period must be >= 1, got 0"):
        AllocatorPurgeHook(period=0)
