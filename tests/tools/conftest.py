"""Fixtures of the tool tests."""

import os
import types

import pytest
from detectron2.config import LazyConfig
from helpers import register_tiny_shapes, tiny_train_config


@pytest.fixture(scope="module")
def tiny_config_file(tmp_path_factory):
    """A YAML config of the tiny model on a 4 + 2 image shapes dataset (64 px, batch 2)."""
    root = tmp_path_factory.mktemp("tools")
    names = register_tiny_shapes(str(root / "shapes"), f"test_tools_{os.getpid()}")
    cfg = tiny_train_config(root / "output", names)
    path = str(root / "tiny.yaml")
    LazyConfig.save(cfg, path)
    return types.SimpleNamespace(path=path, batch_size=cfg.dataloader.train.total_batch_size)
