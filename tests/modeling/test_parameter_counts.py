"""Pinned parameter counts of the reference config: an architecture change must be deliberate."""

import pytest
from detectron2.config import LazyConfig, instantiate
from helpers import CONFIG_DIR


def _count(module):
    return sum(parameter.numel() for parameter in module.parameters())


@pytest.mark.parametrize(
    "config, expected",
    [
        (
            "focus_detr_r50_4scale_12ep.py",
            {
                "total": 49_339_920,
                "backbone": 23_454_912,  # ResNet-50 without its classifier
                "neck": 5_639_168,
                "encoder": 9_382_660,
                "foreground_selector": 107_524,
                "decoder": 10_391_800,
                "query_selection": 449_876,
                "denoising": 20_480,  # 80 classes x 256
            },
        ),
    ],
)
def test_r50_parameter_counts(config, expected, single_thread):
    model = instantiate(LazyConfig.load(f"{CONFIG_DIR}/{config}").model)
    counts = {
        "total": _count(model),
        "backbone": _count(model.backbone),
        "neck": _count(model.neck),
        "encoder": _count(model.encoder),
        "foreground_selector": _count(model.encoder.selector),
        "decoder": _count(model.decoder),
        "query_selection": _count(model.query_selection),
        "denoising": _count(model.denoising),
    }
    assert counts == expected
