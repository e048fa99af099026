"""
Shared fixtures; the tiny models and inputs themselves live in ``tests/helpers.py``, importable as
``helpers`` because pyproject.toml's pytest ``pythonpath`` option puts ``tests/`` (and the
repository root, for ``train_net``) on the path, in every import mode and in the processes that
detectron2's ``launch`` spawns (they receive the parent's path).
"""

import logging
import os
import types

import helpers
import pytest
import torch


def pytest_report_header(config):
    """Says whether the compiled kernels are tested or only the PyTorch fallback."""
    from focus_detr.layers.ms_deform_attn_op import extension_kernels, extension_load_error

    if extension_load_error():
        return f"focus_detr._C: not loaded ({extension_load_error()}), PyTorch fallback only"
    kernels = ", ".join(device.upper() for device in extension_kernels()) or "none"
    return f"focus_detr._C: loaded, compiled kernels: {kernels}"


@pytest.fixture(scope="module")
def single_thread():
    """
    One intra-op thread for a module of tiny-model tests (``pytestmark =
    pytest.mark.usefixtures("single_thread")``). Their ops are too small to gain from more
    threads, and on a busy CI runner OpenMP threads that spin against other processes made
    these tests several times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model():
    """A fresh tiny Focus-DETR (3 classes, 32 channels) in training mode."""
    return helpers.build_tiny_model().train()


@pytest.fixture
def tiny_batched_inputs():
    """Two images of 200x250 and 200x249; the first with two boxes, the second without."""
    return helpers.make_batched_inputs()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A 4 + 2 image synthetic dataset (64..96 pixels) registered under a unique name."""
    root = str(tmp_path_factory.mktemp("shapes"))
    prefix = f"test_training_{os.getpid()}"
    return types.SimpleNamespace(
        root=root, prefix=prefix, names=helpers.register_tiny_shapes(root, prefix)
    )


@pytest.fixture
def log(caplog):
    """
    ``caplog`` at INFO that also sees the "focus_detr" and "detectron2" loggers, which
    detectron2's ``setup_logger`` (called by ``train_net.main``) stops from propagating: they
    get caplog's handler and do not propagate during the test (each record is seen once).
    """
    loggers = [logging.getLogger(name) for name in ("focus_detr", "detectron2")]
    propagate = [logger.propagate for logger in loggers]
    for logger in loggers:
        logger.addHandler(caplog.handler)
        logger.propagate = False
    caplog.set_level(logging.INFO)
    yield caplog
    for logger, value in zip(loggers, propagate):
        logger.removeHandler(caplog.handler)
        logger.propagate = value
