"""
Heap trimming: freed blocks that glibc keeps in its heap (what made the soak test's resident
memory grow) go back to the system after ``release_free_heap``; HeapTrimHook's period.
"""

import subprocess
import sys
import textwrap

import pytest
from detectron2.engine import TrainerBase

from focus_detr.engine import host_memory
from focus_detr.engine.host_memory import HeapTrimHook

GLIBC = host_memory._malloc_trim() is not None

# Frees one 24 MiB tensor (glibc then raises its mmap threshold to 24 MiB, so the next blocks
# come from the heap), allocates 60 blocks of 2 MiB, frees every other one and prints how much of
# the freed 60 MiB left the resident set, then how much more left after release_free_heap().
_PROBE = textwrap.dedent("""
    import os, torch
    from focus_detr.engine.host_memory import release_free_heap
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    big = torch.ones(6 * 2**20)
    del big
    blocks = [torch.ones(2**19) for _ in range(60)]
    before = rss()
    del blocks[::2]
    freed = rss()
    assert release_free_heap()
    print(before - freed, freed - rss())
    """)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc_trim is not available here")
def test_trimming_returns_the_holes_that_the_heap_keeps():
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    released_by_free, released_by_trim = map(float, result.stdout.split()[-2:])
    assert released_by_free < 10, released_by_free  # the holes stay resident
    assert released_by_trim > 50, released_by_trim  # ~60 MiB returned


class _Trainer(TrainerBase):
    def run_step(self) -> None:
        pass


def test_hook_trims_every_period_steps(monkeypatch):
    monkeypatch.setattr(host_memory, "_malloc_trim", lambda: (lambda pad: calls.append(pad)))
    calls = []
    trainer = _Trainer()
    trainer.register_hooks([HeapTrimHook(4)])
    trainer.train(0, 10)  # steps 0..9: after steps 3 and 7
    assert calls == [0, 0]


@pytest.mark.parametrize("period", [0, -5, 2.5, True])
def test_invalid_period_is_rejected_with_its_value(period):
    with pytest.raises(ValueError, match=f"got {period!r}"):
        HeapTrimHook(period)


def test_without_glibc_the_hook_does_nothing_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(host_memory, "_malloc_trim", lambda: None)
    with caplog.at_level("INFO", logger="focus_detr.engine.host_memory"):
        hook = HeapTrimHook(1)
    assert not hook.available and "not trimmed" in caplog.text
    assert host_memory.release_free_heap() is False
