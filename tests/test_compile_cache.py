"""
torch.compile's on-disk cache is separated by CPU capability once focus_detr is imported (see
focus_detr/compile_cache.py): a graph compiled under one capability must not be served under
another, where its kernels computed wrong values.
"""

import os
import subprocess
import sys

import pytest
import torch

import focus_detr  # noqa: F401  (tags the compile cache)
from focus_detr.compile_cache import tag_compile_cache_with_cpu_capability

# Compiled (matrix product -> masked_fill over channels) against eager; prints the max difference.
# Without the tag, a cache filled natively and read under ATEN_CPU_CAPABILITY=avx2 gave 8.1 here.
PROGRAM = """
import torch
import focus_detr

def masked_projection(x, weight, mask):
    return (x @ weight).masked_fill(mask[..., None], 0.0)

torch.manual_seed(0)
x, weight = torch.randn(2, 54, 32), torch.randn(32, 32)
mask = torch.zeros(2, 54, dtype=torch.bool)
mask[1, -5:] = True
compiled = torch.compile(masked_projection)(x, weight, mask)
print((compiled - masked_projection(x, weight, mask)).abs().max().item())
"""


def test_tag_names_the_capability_once_and_keeps_the_users_tag(monkeypatch):
    monkeypatch.setattr(torch.compiler.config, "cache_key_tag", "mine")
    tag = tag_compile_cache_with_cpu_capability()
    capability = torch.backends.cpu.get_cpu_capability()
    assert tag == f"mine|cpu_capability={capability}"
    assert tag_compile_cache_with_cpu_capability() == tag  # not appended twice


def _other_capability() -> str:
    """A capability below the native one: AVX2 on AVX-512 machines, no vectors on AVX2 ones."""
    return "avx2" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else "default"


@pytest.mark.slow
@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() == "DEFAULT", reason="no vector capability to vary"
)
def test_cache_filled_under_one_capability_is_not_served_to_another(tmp_path):
    environment = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    environment["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    environment["OMP_NUM_THREADS"] = "1"
    differences = []
    for capability in (None, _other_capability()):
        run_environment = dict(environment)
        if capability is not None:
            run_environment["ATEN_CPU_CAPABILITY"] = capability
        result = subprocess.run(
            [sys.executable, "-c", PROGRAM],
            env=run_environment,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, (capability, result.stderr[-3000:])
        differences.append(float(result.stdout.strip().splitlines()[-1]))
    # float32 matrix product, same kernels in eager and compiled code up to summation order
    assert max(differences) < 1e-4, differences
