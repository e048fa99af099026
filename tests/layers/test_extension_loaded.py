"""CI guard: with FOCUS_DETR_REQUIRE_EXTENSION=1 the suite fails when focus_detr._C is missing.

Without the extension every op test still passes (the PyTorch fallback is used), so a broken
build would go unnoticed; CI sets the variable where it builds the extension.
"""

import os

import pytest

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
