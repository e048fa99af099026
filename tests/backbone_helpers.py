"""Backbone model configs shrunk for CPU tests, shared by the backbone test modules."""

import copy
import importlib.util
from typing import Callable, Dict, Optional

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from helpers import CONFIG_DIR, shrink_model_config
from torch import nn

HIDDEN = 32

# detectron2's ViT and MViT blocks import timm's Mlp, Swin its DropPath when drop path > 0.
requires_timm = pytest.mark.skipif(
    importlib.util.find_spec("timm") is None,
    reason="detectron2's ViT, MViT and Swin with drop path need timm (pip install timm)",
)


def shrink_transformer(model, num_levels: Optional[int] = None):
    """The tiny transformer of tests/helpers.py (the backbone kept as it is); ``num_levels``
    given: the encoder's and decoder's level count."""
    backbone = copy.deepcopy(model.backbone)
    shrink_model_config(model, hidden_dim=HIDDEN)
    model.backbone = backbone
    if num_levels is not None:
        model.encoder.num_levels = model.decoder.num_levels = num_levels
    return model


# Backbone shrinkers. ResNet widths are not configurable: R50/R101 run at full size.
def tiny_regnet(backbone):
    backbone.update(stem_width=8, depth=4, w_a=12.8, w_0=16, w_m=1.5, group_width=8)


def tiny_swin(backbone):
    backbone.update(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), drop_path_rate=0.0)


def tiny_vit(backbone):
    # 160 x 160 square padding (every test image fits): 10 x 10 tokens, 5 x 5 windows
    backbone.square_pad = 160
    backbone.out_channels = HIDDEN
    backbone.net.update(
        img_size=160,
        embed_dim=48,
        depth=2,
        num_heads=2,
        window_size=5,
        window_block_indexes=[0],
        drop_path_rate=0.0,
    )


def tiny_mvit(backbone):
    backbone.update(
        embed_dim=16, depth=4, last_block_indexes=(0, 1, 2, 3), img_size=128, drop_path_rate=0.0
    )


MODEL_CONFIGS: Dict[str, Optional[Callable]] = {
    "focus_detr_r50.py": None,
    "focus_detr_r101.py": None,
    "focus_detr_regnety_4gf.py": tiny_regnet,
    "focus_detr_swin_tiny.py": tiny_swin,
    "focus_detr_swin_small.py": tiny_swin,
    "focus_detr_swin_base_384.py": tiny_swin,
    "focus_detr_swin_large_384.py": tiny_swin,
    "focus_detr_vit_base.py": tiny_vit,
    "focus_detr_mvitv2_tiny.py": tiny_mvit,
}
NEEDS_TIMM = ("focus_detr_vit_base.py", "focus_detr_mvitv2_tiny.py")
MODEL_PARAMS = [
    pytest.param(name, marks=[requires_timm] if name in NEEDS_TIMM else [])
    for name in MODEL_CONFIGS
]


def load_model_config(name: str):
    return LazyConfig.load(str(CONFIG_DIR / "common" / "models" / name)).model


def tiny_model(name: str) -> nn.Module:
    model = shrink_transformer(load_model_config(name))
    if MODEL_CONFIGS[name] is not None:
        MODEL_CONFIGS[name](model.backbone)
    torch.manual_seed(0)
    return instantiate(model)
