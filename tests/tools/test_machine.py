"""focus_detr.tools.machine: CPU model, instruction-set flags and limits."""

import torch

from focus_detr.tools import machine
from focus_detr.tools.machine import ISA_FLAGS, describe_machine

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx2 fma avx512f
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx2 fma avx512f
"""


def test_describe_machine_reports_flags_and_limits(monkeypatch):
    monkeypatch.setattr(
        machine, "_parse_cpuinfo_file", lambda: machine._parse(CPUINFO.splitlines())
    )
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    described = describe_machine(torch.device("cpu"))
    assert described["cpu"] == "AMD EPYC 7B13"
    flags = {flag: described[f"flag {flag}"] for flag in ISA_FLAGS}
    assert flags == {
        "avx2": "yes",
        "fma": "yes",
        "avx512f": "yes",
        "avx512_bf16": "no",
        "amx_bf16": "no",
    }
    assert described["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert described["ATEN_CPU_CAPABILITY"] == "unset"
    assert described["torch cpu capability"] == torch.backends.cpu.get_cpu_capability()
    assert described["torch threads"] == str(torch.get_num_threads())
    assert "gpu" not in described


def test_flags_unknown_without_cpuinfo_or_lscpu(monkeypatch):
    monkeypatch.setattr(machine, "_parse_cpuinfo_file", lambda: (None, set()))
    monkeypatch.setattr(machine, "_parse_lscpu", lambda: (None, set()))
    model, flags = machine.read_cpu_info()
    assert model and flags is None
    assert describe_machine()["flag avx2"] == "unknown"
