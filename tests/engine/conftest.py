"""Fixtures of the engine tests."""

import os
import types

import pytest
from helpers import register_tiny_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A 4 + 2 image synthetic dataset (64..96 pixels) registered under a unique name."""
    root = str(tmp_path_factory.mktemp("shapes"))
    prefix = f"test_training_{os.getpid()}"
    return types.SimpleNamespace(root=root, prefix=prefix, names=register_tiny_shapes(root, prefix))
