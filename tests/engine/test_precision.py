"""
The precision choice of training (focus_detr.engine.precision): ``train.amp.enabled`` = True,
False or "auto", where "auto" times bfloat16 autocast against float32 on the CPU.
"""

import logging
import os
import platform
import subprocess
import sys

import pytest
import torch
from detectron2.config import LazyConfig
from helpers import REPO_ROOT, build_tiny_model, tiny_model_config, tiny_train_config

from focus_detr.engine import DETRTrainer, do_train, precision, step_probe, train_loop
from focus_detr.engine.precision import (
    MIN_SPEEDUP,
    AmpChoice,
    ProbeResult,
    amp_from_config,
    measure_cpu_bfloat16,
    resolve_amp,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _probe(float32_ms: float, bfloat16_ms: float, calls=None):
    """A probe that reports the given times and records its arguments in ``calls``."""

    def probe(**sizes):
        if calls is not None:
            calls.append(sizes)
        return ProbeResult(float32_ms / 1000, bfloat16_ms / 1000, False, "fake ops")

    return probe


def _failing_probe(**sizes):
    raise AssertionError(f"the probe ran for a forced setting ({sizes})")


@pytest.fixture
def precision_log(caplog, monkeypatch):
    """The log records of focus_detr.engine.precision in this test, also when an enclosing
    logger does not propagate (detectron2's setup_logger("focus_detr") turns that off)."""
    caplog.set_level(logging.INFO, logger=precision.logger.name)
    logger = precision.logger
    while logger is not None:
        monkeypatch.setattr(logger, "propagate", True)
        logger = logger.parent
    return caplog


def test_auto_picks_float32_when_bfloat16_is_measured_slower(precision_log):
    choice = resolve_amp("auto", "cpu", probe=_probe(10.0, 95.0))
    assert choice == AmpChoice(False, None, choice.reason)
    assert "9.50x slower" in choice.reason
    assert "float32 10.00 ms, bfloat16 95.00 ms" in choice.reason
    assert len(precision_log.records) == 1
    message = precision_log.records[0].getMessage()
    assert "float32" in message and choice.reason in message and "(auto)" in message


def test_auto_picks_bfloat16_when_measured_faster(precision_log):
    calls = []
    choice = resolve_amp("auto", "cpu", probe=_probe(30.0, 12.0, calls), hidden_dim=64, ffn_dim=96)
    assert choice.enabled and choice.dtype == torch.bfloat16
    assert "2.50x faster" in choice.reason
    assert calls == [dict(hidden_dim=64, ffn_dim=96)]
    assert (
        len(precision_log.records) == 1
        and "bfloat16 autocast" in precision_log.records[0].getMessage()
    )


def test_auto_keeps_float32_for_a_gain_below_the_threshold():
    choice = resolve_amp("auto", "cpu", probe=_probe(10.0, 10.0 / (0.99 * MIN_SPEEDUP)))
    assert not choice.enabled and "only" in choice.reason
    assert resolve_amp("auto", "cpu", probe=_probe(10.0, 10.0 / MIN_SPEEDUP * 0.999)).enabled


def test_forced_settings_are_obeyed_without_timing(precision_log):
    on = resolve_amp(True, "cpu", probe=_failing_probe)
    off = resolve_amp(False, "cpu", probe=_failing_probe)
    assert (on.enabled, on.dtype) == (True, torch.bfloat16)
    assert (off.enabled, off.dtype) == (False, None)
    assert [r.getMessage().split(":")[0] for r in precision_log.records] == [
        "Precision on cpu (forced)",
        "Precision on cpu (forced)",
    ]


@pytest.mark.parametrize("value", ["yes", 2, 1, 0, None, "Auto", "true"])
def test_invalid_settings_raise_naming_the_value(value):
    with pytest.raises(ValueError, match="train.amp.enabled") as error:
        resolve_amp(value, "cpu", probe=_failing_probe)
    assert repr(value) in str(error.value)


@pytest.mark.parametrize(
    "capability, expected",
    [((9, 0), torch.bfloat16), ((8, 6), torch.bfloat16), ((7, 5), torch.float16), ((6, 1), None)],
)
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    choice = resolve_amp("auto", "cuda:0", probe=_failing_probe)
    assert choice.enabled == (expected is not None) and choice.dtype == expected
    assert f"{capability[0]}.{capability[1]}" in choice.reason
    forced = resolve_amp(True, "cuda", probe=_failing_probe)
    assert forced.enabled and forced.dtype == (expected or torch.float16)


def test_amp_from_config_reads_the_setting_and_the_model_sizes(monkeypatch):
    calls = []
    monkeypatch.setattr(precision, "measure_cpu_bfloat16", _probe(5.0, 50.0, calls))
    cfg = LazyConfig.load(str(REPO_ROOT / "configs" / "common" / "train.py"))
    cfg.model = tiny_model_config(hidden_dim=48)
    cfg.train.amp.enabled = "auto"
    assert amp_from_config(cfg, "cpu").enabled is False
    assert calls == [dict(hidden_dim=48, ffn_dim=96)]
    cfg.train.amp.enabled = True
    assert amp_from_config(cfg, "cpu").enabled
    del cfg.train.amp
    assert amp_from_config(cfg, "cpu").enabled is False  # absent: float32
    cfg.train.amp = dict(enabled="yes")
    with pytest.raises(ValueError, match="'yes'"):
        amp_from_config(cfg, "cpu")


@pytest.mark.parametrize("main_process", [True, False])
def test_amp_from_config_takes_the_choice_of_rank_0(monkeypatch, main_process):
    gathered = []
    rank0 = AmpChoice(True, torch.bfloat16, "measured on rank 0")

    def all_gather(choice):
        gathered.append(choice)
        return [choice if main_process else rank0, None]

    monkeypatch.setattr(precision.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(precision.comm, "is_main_process", lambda: main_process)
    monkeypatch.setattr(precision.comm, "all_gather", all_gather)
    monkeypatch.setattr(
        precision, "measure_cpu_bfloat16", _probe(20.0, 10.0) if main_process else _failing_probe
    )
    cfg = LazyConfig.load(str(REPO_ROOT / "configs" / "common" / "train.py"))
    cfg.train.amp.enabled = "auto"
    choice = amp_from_config(cfg, "cpu")
    assert choice.enabled and choice.dtype == torch.bfloat16
    assert gathered == [choice if main_process else None]
    if not main_process:
        assert choice == rank0
    cfg.train.amp.enabled = False  # forced: every process decides alike, nothing gathered
    assert not amp_from_config(cfg, "cpu").enabled and len(gathered) == 1


def test_trainer_rejects_an_unresolved_setting():
    model = build_tiny_model()
    with pytest.raises(ValueError, match="'auto'"):
        DETRTrainer(model, [], torch.optim.SGD(model.parameters(), lr=0.1), amp="auto")


def test_do_train_uses_the_measured_choice(shapes, tmp_path, monkeypatch, precision_log):
    dtypes = []
    build = train_loop.build_model

    def build_with_probe(cfg):
        model = build(cfg)
        model.query_selection.class_head.register_forward_hook(
            lambda module, inputs, output: dtypes.append(output.dtype)
        )
        return model

    monkeypatch.setattr(train_loop, "build_model", build_with_probe)
    monkeypatch.setattr(precision, "measure_cpu_bfloat16", _probe(20.0, 10.0))
    timed_steps = []

    def step_timing(model, batch, **kwargs):
        timed_steps.append(len(batch))
        return precision.ProbeResult(2.0, 1.0, False, "the model's step")

    monkeypatch.setattr(step_probe, "measure_model_step", step_timing)
    cfg = tiny_train_config(tmp_path, shapes.names, max_iter=1)
    cfg.train.amp.enabled = "auto"
    del cfg.dataloader.evaluator
    do_train(cfg)
    assert timed_steps == [2]  # the config's batch of 2 images was timed
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert sum("Precision on cpu (auto)" in r.getMessage() for r in precision_log.records) == 1


def test_measure_cpu_bfloat16_times_both_and_keeps_the_random_and_thread_state():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    result = measure_cpu_bfloat16(hidden_dim=16, ffn_dim=32)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads
    assert result.float32_s > 0 and result.bfloat16_s > 0
    assert "1 thread" in result.description
    with pytest.raises(ValueError, match="0, 32"):
        measure_cpu_bfloat16(hidden_dim=0, ffn_dim=32)


@pytest.mark.slow  # a fresh interpreter: torch and detectron2 imports
@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 instruction-set limits"
)
def test_auto_picks_float32_where_bfloat16_is_emulated():
    """ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2: no x86 CPU runs bfloat16 natively."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    code = (
        "import torch; from focus_detr.engine.precision import resolve_amp; "
        "choice = resolve_amp('auto', 'cpu', hidden_dim=32, ffn_dim=64); "
        "print(choice.enabled, torch.backends.cpu.get_cpu_capability()); print(choice.reason)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    first, reason = result.stdout.splitlines()[:2]
    assert first.split()[0] == "False", result.stdout
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in reason and "slower" in reason


def test_the_model_step_decides_when_bfloat16_is_native(monkeypatch):
    """With the model given, a non-emulated op timing hands the decision to the model's step."""
    from focus_detr.engine import precision

    native_ops = lambda **sizes: precision.ProbeResult(1.0, 0.5, False, "ops")  # noqa: E731
    emulated = lambda **sizes: precision.ProbeResult(1.0, 20.0, True, "ops")  # noqa: E731
    slower_step = lambda: precision.ProbeResult(0.5, 0.6, False, "step")  # noqa: E731
    faster_step = lambda: precision.ProbeResult(0.6, 0.5, False, "step")  # noqa: E731
    choice = precision.resolve_amp("auto", "cpu", probe=native_ops, step_probe=slower_step)
    assert not choice.enabled and "step" in choice.reason
    choice = precision.resolve_amp("auto", "cpu", probe=native_ops, step_probe=faster_step)
    assert choice.enabled and choice.dtype == torch.bfloat16
    # emulated bfloat16 ends the timing before the (slow) model step is tried
    calls = []
    choice = precision.resolve_amp(
        "auto", "cpu", probe=emulated, step_probe=lambda: calls.append(1) or faster_step()
    )
    assert not choice.enabled and calls == []


def test_model_step_probe_leaves_the_model_unchanged():
    from detectron2.config import instantiate
    from helpers import tiny_model_config

    from focus_detr.engine.step_probe import measure_model_step, probe_batch

    torch.manual_seed(0)
    model = instantiate(tiny_model_config()).eval()
    state = {name: value.clone() for name, value in model.state_dict().items()}
    rng = torch.get_rng_state()
    result = measure_model_step(model, probe_batch(64, num_images=2, num_classes=3), runs=1)
    assert (
        result.float32_s > 0 and result.bfloat16_s > 0 and "2 images of 64x64" in result.description
    )
    assert not model.training  # restored
    assert all(torch.equal(state[name], value) for name, value in model.state_dict().items())
    assert all(parameter.grad is None for parameter in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
