"""The one timer, memory reader and machine description of focus_detr.benchmark."""

import ctypes.util
import os
import subprocess
import sys

import pytest
import torch
from detectron2.utils.events import EventStorage
from torch import nn

from focus_detr.benchmark import machine, memory, timer
from focus_detr.benchmark.machine import describe_machine
from focus_detr.benchmark.timer import SectionTimer, time_runs
from focus_detr.engine import DETRTrainer


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
    monkeypatch.setattr(timer.time, "perf_counter", clock)
    model = _Detector(clock)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # 8 s in the optimizer step: a post-hook that runs before the timer's (registered first)
    optimizer.register_step_post_hook(lambda *args: setattr(clock, "now", clock.now + 8.0))
    trainer = DETRTrainer(model, [[torch.ones(3)]] * 3, optimizer, clip_grad_max_norm=None)
    sections = SectionTimer(model, optimizer=optimizer, trainer=trainer)
    with EventStorage(0) as trainer.storage:
        trainer.iter = 0
        step_times = time_runs(trainer.run_step, warmup=1, iters=2, sections=sections)
    # per step: 0.5 + 1 + 2 + 4 forward, 0.75 backward, 8 optimizer
    assert step_times == pytest.approx([16.25, 16.25])
    expected = {
        "backbone": 2.0,
        "decoder": 4.0,  # its own 2 s per step, without the criterion it calls
        "criterion": 8.0,
        "forward (other)": 1.0,
        "loss sum + backward": 1.5,  # 3 x 0.25 s per step in the weights' gradient hooks
        "grad clipping + metrics": 0.0,
        "optimizer step": 16.0,
    }
    assert list(sections.totals()) == list(expected)  # step order
    assert sections.totals() == pytest.approx(expected)
    assert sections.times["decoder"] == pytest.approx([2.0, 2.0])  # one entry per call

    sections.reset()
    assert not sections.totals()
    sections.remove()
    model({0: torch.ones(3)})
    assert not sections.totals(), "hooks still attached after remove()"
    with pytest.raises(ValueError, match="iters >= 1, got 1 and 0"):
        time_runs(lambda: None, warmup=1, iters=0)


def test_inference_sections_leave_out_what_did_not_run():
    model = _Detector(_Clock())
    sections = SectionTimer(model, modules=("backbone", "neck", "decoder"))
    with torch.no_grad():
        model([torch.ones(3)])
    assert list(sections.totals()) == ["backbone", "decoder", "forward (other)"]


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx2 fma avx512f
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16
"""


def test_machine_names_the_cpu_its_flags_and_limits(monkeypatch):
    monkeypatch.setattr(machine, "_cpuinfo_lines", lambda: CPUINFO.splitlines())
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    described = describe_machine(torch.device("cpu"))
    assert described["cpu"] == "AMD EPYC 7B13"
    assert described["cpu flags"] == "avx2 fma avx512f"  # of the first processor
    assert described["isa limits"] == "ONEDNN_MAX_CPU_ISA=AVX2"
    assert described["torch cpu capability"] == torch.backends.cpu.get_cpu_capability()
    assert described["torch threads"] == str(torch.get_num_threads())
    assert described["allocator"].startswith(("system malloc", "jemalloc", "tcmalloc"))
    assert "gpu" not in described


def test_machine_falls_back_to_lscpu_then_says_unknown(monkeypatch):
    monkeypatch.setattr(machine, "_cpuinfo_lines", lambda: [])
    monkeypatch.setattr(machine, "_lscpu_lines", lambda: CPUINFO.splitlines()[1:])
    assert machine.read_cpu_info() == ("AMD EPYC 7B13", {"fpu", "sse2", "avx2", "fma", "avx512f"})
    monkeypatch.setattr(machine, "_lscpu_lines", lambda: [])
    model, flags = machine.read_cpu_info()
    assert model and flags is None
    assert describe_machine()["cpu flags"] == "unknown"


@pytest.mark.skipif(memory.peak_memory_mb() is None, reason="needs Linux /proc VmHWM")
def test_the_peak_restarts_from_the_current_memory_after_a_reset():
    assert memory.reset_peak_memory()
    block = b"x" * (200 << 20)
    del block
    memory.release_free_memory()  # the allocator may keep the freed pages otherwise
    assert memory.peak_memory_mb() - memory.resident_memory_mb() > 150
    assert memory.reset_peak_memory()
    assert memory.peak_memory_mb() - memory.resident_memory_mb() < 20
    # what a call adds at its peak, though it frees it before returning
    assert 150 < memory.measure_peak_mb(lambda: bytearray(200 << 20), "cpu") < 260


@pytest.mark.skipif(
    ctypes.util.find_library("jemalloc") is None or not os.path.exists("/proc/self/maps"),
    reason="needs jemalloc and Linux /proc",
)
def test_a_preloaded_jemalloc_is_named_and_purged():
    code = (
        "from focus_detr.benchmark.machine import describe_machine\n"
        "from focus_detr.benchmark.memory import release_free_memory\n"
        "print(describe_machine()['allocator'], '|', release_free_memory())"
    )
    env = dict(os.environ, LD_PRELOAD=ctypes.util.find_library("jemalloc"))
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    allocator, _, released = result.stdout.strip().rpartition("\n")[2].partition(" | ")
    assert allocator.startswith("jemalloc (") and released == "jemalloc purge", result.stdout
