"""
The precision choice of training (focus_detr.engine.precision): ``train.amp.enabled`` = True,
False or "auto", where "auto" decides from what the device reports (CPU instructions and limits,
CUDA compute capability). The CPU kinds are simulated: the tests do not depend on this machine.
"""

import logging
import os
import platform
import subprocess
import sys

import pytest
import torch
from detectron2.config import LazyConfig
from helpers import REPO_ROOT, build_tiny_model, import_train_net, tiny_train_config

from focus_detr.engine import DETRTrainer, precision
from focus_detr.engine.precision import (
    AmpChoice,
    amp_from_config,
    cpu_bfloat16_support,
    resolve_amp,
)

# what torch reports on each CPU kind: (AMX tiles, AVX512-BF16, ATen capability)
INTEL_AMX = (True, True, "AVX512")  # Sapphire Rapids and later
AMX_ONLY = (True, False, "AVX512")
ZEN4 = (False, True, "AVX512")  # AMD Zen 4 / 5, Intel Cooper Lake
AVX512_ONLY = (False, False, "AVX512")  # Skylake-SP .. Ice Lake
AVX2_ONLY = (False, False, "AVX2")
ZEN4_LIMITED = (False, True, "AVX2")  # a Zen 4 under ATEN_CPU_CAPABILITY=avx2


@pytest.fixture
def cpu_kind(monkeypatch):
    """``cpu_kind(KIND)``: torch reports the CPU kind ``KIND`` (a tuple above), and the process
    has no ISA limit in its environment (CI also runs these tests under ATEN_CPU_CAPABILITY and
    ONEDNN_MAX_CPU_ISA; a test that sets a limit does so itself)."""

    def simulate(kind):
        for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
            monkeypatch.delenv(name, raising=False)
        amx, avx512_bf16, capability = kind
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)

    return simulate


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


@pytest.mark.parametrize(
    "kind, environ, native",
    [
        (INTEL_AMX, {}, True),
        (ZEN4, {}, True),
        (AVX2_ONLY, {}, False),
        (AVX512_ONLY, {}, False),
        (ZEN4_LIMITED, {"ATEN_CPU_CAPABILITY": "avx2"}, False),
        (ZEN4, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),
        (ZEN4, {"ONEDNN_MAX_CPU_ISA": "avx512_core"}, False),
        (ZEN4, {"ONEDNN_MAX_CPU_ISA": "avx512_core_bf16"}, True),
        (ZEN4, {"ONEDNN_MAX_CPU_ISA": "All"}, True),
        (ZEN4, {"ONEDNN_MAX_CPU_ISA": "DEFAULT"}, True),
        (ZEN4, {"ONEDNN_MAX_CPU_ISA": "AVX10_1_512"}, True),
        (INTEL_AMX, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, False),
        (INTEL_AMX, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, True),
        (AMX_ONLY, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, False),
        (AMX_ONLY, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, True),
        (AMX_ONLY, {"ONEDNN_MAX_CPU_ISA": "avx10_1_512_amx"}, True),
    ],
)
def test_cpu_bfloat16_is_native_only_with_the_instructions_and_no_limit_below_them(
    cpu_kind, kind, environ, native
):
    cpu_kind(kind)
    choice = cpu_bfloat16_support(environ)
    assert choice.enabled == native and choice.dtype == (torch.bfloat16 if native else None)
    assert f"torch CPU capability {kind[2]}" in choice.reason
    for name, value in environ.items():
        assert f"{name}={value}" in choice.reason


def test_an_unknown_onednn_limit_gives_float32_and_is_named(cpu_kind):
    cpu_kind(ZEN4)
    choice = cpu_bfloat16_support({"ONEDNN_MAX_CPU_ISA": "AVX512_BF16"})
    assert not choice.enabled
    assert "ONEDNN_MAX_CPU_ISA='AVX512_BF16' is none of SSE41, AVX, AVX2," in choice.reason


@pytest.mark.parametrize(
    "kind, environ, expected",
    [
        (
            INTEL_AMX,
            {},
            "Precision on cpu (auto): bfloat16 autocast, the CPU runs bfloat16 natively "
            "(AMX and AVX512-BF16; torch CPU capability AVX512)",
        ),
        (
            ZEN4,
            {},
            "Precision on cpu (auto): bfloat16 autocast, the CPU runs bfloat16 natively "
            "(AVX512-BF16; torch CPU capability AVX512)",
        ),
        (
            AVX2_ONLY,
            {},
            "Precision on cpu (auto): float32, bfloat16 would be emulated on this CPU "
            "(no AMX or AVX512-BF16; torch CPU capability AVX2)",
        ),
        (
            ZEN4_LIMITED,
            {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
            "Precision on cpu (auto): float32, torch's CPU kernels are limited below AVX512 "
            "(AVX512-BF16; torch CPU capability AVX2; ATEN_CPU_CAPABILITY=avx2; "
            "ONEDNN_MAX_CPU_ISA=AVX2)",
        ),
    ],
)
def test_auto_on_each_cpu_kind_logs_one_line_saying_what_and_why(
    cpu_kind, precision_log, monkeypatch, kind, environ, expected
):
    cpu_kind(kind)
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    choice = resolve_amp("auto", "cpu")
    assert choice.enabled == expected.startswith("Precision on cpu (auto): bfloat16")
    assert [r.getMessage() for r in precision_log.records] == [expected]


def test_forced_settings_are_obeyed_whatever_the_cpu(cpu_kind, precision_log):
    cpu_kind(AVX2_ONLY)
    on = resolve_amp(True, "cpu")
    cpu_kind(INTEL_AMX)
    off = resolve_amp(False, "cpu")
    assert (on.enabled, on.dtype) == (True, torch.bfloat16)
    assert (off.enabled, off.dtype) == (False, None)
    assert [r.getMessage() for r in precision_log.records] == [
        "Precision on cpu (forced): bfloat16 autocast, forced by train.amp.enabled=True",
        "Precision on cpu (forced): float32, forced by train.amp.enabled=False",
    ]


@pytest.mark.parametrize("value", ["yes", 2, 1, 0, None, "Auto", "true"])
def test_invalid_settings_raise_naming_the_value(value):
    with pytest.raises(ValueError, match="train.amp.enabled") as error:
        resolve_amp(value, "cpu")
    assert repr(value) in str(error.value)


@pytest.mark.parametrize(
    "capability, expected",
    [((9, 0), torch.bfloat16), ((8, 6), torch.bfloat16), ((7, 5), torch.float16), ((6, 1), None)],
)
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    choice = resolve_amp("auto", "cuda:0")
    assert choice.enabled == (expected is not None) and choice.dtype == expected
    assert f"{capability[0]}.{capability[1]}" in choice.reason
    forced = resolve_amp(True, "cuda")
    assert forced.enabled and forced.dtype == (expected or torch.float16)


def test_auto_on_another_device_type_is_float32():
    assert resolve_amp("auto", "meta") == AmpChoice(
        False, None, "no automatic choice for device type 'meta'"
    )


def test_amp_from_config_reads_the_setting(cpu_kind):
    cpu_kind(AVX2_ONLY)
    cfg = LazyConfig.load(str(REPO_ROOT / "configs" / "common" / "train.py"))
    cfg.train.amp.enabled = "auto"
    assert amp_from_config(cfg, "cpu").enabled is False
    cpu_kind(ZEN4)
    assert amp_from_config(cfg, "cpu").dtype == torch.bfloat16
    cfg.train.amp.enabled = False
    assert amp_from_config(cfg, "cpu").enabled is False
    del cfg.train.amp
    assert amp_from_config(cfg, "cpu").enabled is False  # absent: float32
    cfg.train.amp = dict(enabled="yes")
    with pytest.raises(ValueError, match="'yes'"):
        amp_from_config(cfg, "cpu")


@pytest.mark.parametrize("main_process", [True, False])
def test_amp_from_config_takes_the_choice_of_rank_0(monkeypatch, cpu_kind, main_process):
    gathered = []
    rank0 = AmpChoice(True, torch.bfloat16, "decided on rank 0")

    def all_gather(choice):
        gathered.append(choice)
        return [choice if main_process else rank0, None]

    monkeypatch.setattr(precision.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(precision.comm, "is_main_process", lambda: main_process)
    monkeypatch.setattr(precision.comm, "all_gather", all_gather)
    cpu_kind(ZEN4 if main_process else AVX2_ONLY)
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


@pytest.mark.parametrize("kind, dtype", [(ZEN4, torch.bfloat16), (AVX2_ONLY, torch.float32)])
def test_train_net_trains_in_the_automatic_choice(
    shapes, tmp_path, monkeypatch, cpu_kind, precision_log, kind, dtype
):
    train_net = import_train_net()
    dtypes = []
    build = train_net.build_model

    def build_with_probe(cfg):
        model = build(cfg)
        model.query_selection.class_head.register_forward_hook(
            lambda module, inputs, output: dtypes.append(output.dtype)
        )
        return model

    monkeypatch.setattr(train_net, "build_model", build_with_probe)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    cpu_kind(kind)
    cfg = tiny_train_config(tmp_path, shapes.names, max_iter=1)
    cfg.train.amp.enabled = "auto"
    del cfg.dataloader.evaluator
    train_net.do_train(cfg)
    assert dtypes and set(dtypes) == {dtype}
    assert sum("Precision on cpu (auto)" in r.getMessage() for r in precision_log.records) == 1


@pytest.mark.slow  # a fresh interpreter: torch and detectron2 imports
@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 instruction-set limits"
)
def test_auto_honours_the_instruction_set_limits_of_the_environment():
    """ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2: float32 on every x86 CPU, as torch
    itself reports the lowered capability."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    code = (
        "from focus_detr.engine.precision import resolve_amp; "
        "choice = resolve_amp('auto', 'cpu'); print(choice.enabled); print(choice.reason)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    enabled, reason = result.stdout.splitlines()[:2]
    assert enabled == "False", result.stdout
    assert "torch CPU capability AVX2" in reason and "ONEDNN_MAX_CPU_ISA=AVX2" in reason
