"""CI guard: with FOCUS_DETR_REQUIRE_EXTENSION=1 the suite fails when focus_detr._C is missing.

Without the extension every op test still passes (the PyTorch fallback is used), so a broken
build would go unnoticed; CI sets the variable where it builds the extension.
"""

import os
import subprocess
import sys

import pytest

import focus_detr
from focus_detr.layers.ms_deform_attn_op import (
    extension_available,
    extension_kernels,
    extension_load_error,
)

REQUIRE_ENV = "FOCUS_DETR_REQUIRE_EXTENSION"


def test_required_extension_is_loaded():
    if os.environ.get(REQUIRE_ENV, "0") != "1":
        pytest.skip(f"{REQUIRE_ENV} is not 1: the PyTorch fallback is acceptable")
    assert (
        extension_available()
    ), f"{REQUIRE_ENV}=1 but focus_detr._C did not load: {extension_load_error()}"
    assert "cpu" in extension_kernels(), f"focus_detr._C has kernels for {extension_kernels()}"


@pytest.mark.slow
def test_required_extension_fails_without_it():
    # the guard above, run where the extension is disabled, must fail with the reason
    root = os.path.dirname(os.path.dirname(os.path.abspath(focus_detr.__file__)))
    env = dict(os.environ, FOCUS_DETR_DISABLE_EXTENSION="1", **{REQUIRE_ENV: "1"})
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    test = f"{os.path.abspath(__file__)}::test_required_extension_is_loaded"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest", test],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed" in result.stdout
    assert f"{REQUIRE_ENV}=1 but focus_detr._C did not load" in result.stdout
    assert "FOCUS_DETR_DISABLE_EXTENSION=1" in result.stdout
