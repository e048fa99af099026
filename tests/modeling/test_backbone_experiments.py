"""The 12-epoch COCO experiment files of every backbone: data, checkpoints, optimizer."""

from typing import Dict

import numpy as np
import pytest
import torch
from backbone_helpers import load_model_config, requires_timm, tiny_model
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from detectron2.config import LazyConfig, instantiate
from detectron2.data import transforms as T
from helpers import CONFIG_DIR
from torch import nn

# --- experiment files: data, checkpoints, optimizer -------------------------------------------

EXPERIMENTS = {
    "focus_detr_r50_4scale_12ep.py": "ResNet",
    "focus_detr_r101_4scale_12ep.py": "ResNet",
    "focus_detr_regnety_4gf_4scale_12ep.py": "RegNet",
    "focus_detr_swin_tiny_4scale_12ep.py": "SwinTransformer",
    "focus_detr_swin_small_4scale_12ep.py": "SwinTransformer",
    "focus_detr_swin_base_384_4scale_12ep.py": "SwinTransformer",
    "focus_detr_swin_large_384_4scale_12ep.py": "SwinTransformer",
    "focus_detr_vit_base_4scale_12ep.py": "SimpleFeaturePyramid",
    "focus_detr_mvitv2_tiny_4scale_12ep.py": "MViT",
}


def load_experiment(name: str):
    return LazyConfig.load(str(CONFIG_DIR / name))


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_experiment_config(name):
    cfg = load_experiment(name)
    assert cfg.model.backbone._target_.__name__ == EXPERIMENTS[name]
    assert cfg.train.max_iter == 90000  # 12 epochs of 16 images
    assert cfg.train.init_checkpoint and cfg.train.output_dir.endswith(name[: -len(".py")])
    # the mappers hand the model images in the channel order it normalizes
    assert cfg.dataloader.train.mapper.image_format == cfg.model.input_format
    assert cfg.dataloader.test.mapper.image_format == cfg.model.input_format


@pytest.mark.parametrize("name", [n for n, kind in EXPERIMENTS.items() if kind != "ResNet"])
def test_experiment_yaml_round_trip(name, tmp_path):
    """train_net.py saves config.yaml: the backbone configs must survive YAML (no pickle)."""
    cfg = load_experiment(name)
    path = tmp_path / "config.yaml"
    LazyConfig.save(cfg, str(path))
    assert not (tmp_path / "config.yaml.pkl").exists()
    reloaded = LazyConfig.load(str(path))
    LazyConfig.save(reloaded, str(tmp_path / "reloaded.yaml"))
    assert (tmp_path / "reloaded.yaml").read_text() == path.read_text()
    assert reloaded.model.backbone._target_.endswith("." + EXPERIMENTS[name])
    assert reloaded.optimizer.params.get("overrides") == cfg.optimizer.params.get("overrides")
    for param in ("backbone.net.blocks.3.attn.qkv.weight", "decoder.layers.0.norm1.weight"):
        factor = reloaded.optimizer.params.lr_factor_func(param)
        assert factor == pytest.approx(cfg.optimizer.params.lr_factor_func(param))


def test_vit_data_fits_the_square_padding():
    cfg = load_experiment("focus_detr_vit_base_4scale_12ep.py")
    square = cfg.model.backbone.square_pad
    rng = np.random.default_rng(0)
    for loader in (cfg.dataloader.train, cfg.dataloader.test):
        augmentations = T.AugmentationList(instantiate(loader.mapper.augmentations))
        for h, w in [(480, 640), (1333, 800), (427, 1500), (97, 130)] * 3:
            aug_input = T.AugInput(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            augmentations(aug_input)
            assert max(aug_input.image.shape[:2]) <= square, (h, w, aug_input.image.shape)


# ImageNet checkpoints name parameters as the bare backbone does, plus classifier-side entries
# the detector lacks; the backbone's own output norms are not in them.
PRETRAINED = [
    ("focus_detr_regnety_4gf.py", "backbone.", (), {"head.fc.weight": (1000, 1088)}),
    pytest.param(
        "focus_detr_swin_tiny.py",
        "backbone.",
        ("norm1.", "norm2.", "norm3."),
        {"norm.weight": (768,), "head.weight": (1000, 768)},
        marks=requires_timm,  # drop path 0.1
    ),
    pytest.param(
        "focus_detr_vit_base.py",
        "backbone.net.",
        (),
        {"cls_token": (1, 1, 768), "norm.weight": (768,)},
        marks=requires_timm,
    ),
    pytest.param(
        "focus_detr_mvitv2_tiny.py",
        "backbone.",
        ("scale3_norm.", "scale4_norm.", "scale5_norm."),
        {"cls_token": (1, 1, 96), "norm.weight": (768,), "head.projection.weight": (1000, 768)},
        marks=requires_timm,
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, prefix, new_modules, classifier", PRETRAINED)
def test_pretrained_names_load_into_the_backbone_only(name, prefix, new_modules, classifier):
    """detectron2's matching heuristics (``?matching_heuristics=True``, .pyth files) map every
    checkpoint name onto the full-size backbone, and nothing onto the detector's other layers."""
    model = instantiate(load_model_config(name))
    pretrained = model.backbone.net if prefix == "backbone.net." else model.backbone
    checkpoint = {
        key: torch.empty(value.shape)
        for key, value in pretrained.state_dict().items()
        if not key.startswith(new_modules)
    }
    checkpoint.update({key: torch.empty(shape) for key, shape in classifier.items()})
    loaded = align_and_update_state_dicts(model.state_dict(), checkpoint, c2_conversion=False)
    model_keys = set(model.state_dict())
    assert {key for key in loaded if key in model_keys} == {
        prefix + key for key in checkpoint if key not in classifier
    }


def _hyperparameters(cfg, model: nn.Module) -> Dict[str, Dict[str, float]]:
    """Parameter name -> its lr and weight decay, as the trainer builds the optimizer."""
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    return {
        name: {key: group_of[id(p)][key] for key in ("lr", "weight_decay")}
        for name, p in model.named_parameters()
        if id(p) in group_of
    }


@requires_timm
def test_vit_optimizer_layer_decay_and_no_decay_on_positions():
    cfg = load_experiment("focus_detr_vit_base_4scale_12ep.py")
    params = _hyperparameters(cfg, tiny_model("focus_detr_vit_base.py"))
    lr, rate, weight_decay = cfg.optimizer.lr, 0.7, cfg.optimizer.weight_decay
    # 12 layers in the config: block i trains at rate^(12 - i) x lr, the patch embedding lowest
    assert params["backbone.net.patch_embed.proj.weight"]["lr"] == pytest.approx(lr * rate**13)
    assert params["backbone.net.blocks.0.mlp.fc1.weight"]["lr"] == pytest.approx(lr * rate**12)
    assert params["backbone.net.blocks.1.mlp.fc1.weight"]["lr"] == pytest.approx(lr * rate**11)
    # new layers (feature pyramid, neck, transformer) train at the full lr
    for name in ("backbone.simfp_3.0.weight", "neck.projections.0.0.weight"):
        assert params[name]["lr"] == pytest.approx(lr)
    for name in ("pos_embed", "blocks.1.attn.rel_pos_h", "blocks.1.attn.rel_pos_w"):
        assert params["backbone.net." + name]["weight_decay"] == 0.0
    assert params["backbone.net.blocks.0.mlp.fc1.weight"]["weight_decay"] == weight_decay


def test_swin_optimizer_skips_decay_on_positions():
    cfg = load_experiment("focus_detr_swin_tiny_4scale_12ep.py")
    params = _hyperparameters(cfg, tiny_model("focus_detr_swin_tiny.py"))
    lr = cfg.optimizer.lr
    table = params["backbone.layers.0.blocks.0.attn.relative_position_bias_table"]
    assert table == {"lr": pytest.approx(lr * 0.1), "weight_decay": 0.0}
    assert params["backbone.norm1.weight"]["weight_decay"] == 0.0
    qkv = params["backbone.layers.0.blocks.0.attn.qkv.weight"]
    assert qkv == {"lr": pytest.approx(lr * 0.1), "weight_decay": cfg.optimizer.weight_decay}


@requires_timm
def test_mvit_optimizer_skips_decay_on_positions():
    cfg = load_experiment("focus_detr_mvitv2_tiny_4scale_12ep.py")
    params = _hyperparameters(cfg, tiny_model("focus_detr_mvitv2_tiny.py"))
    for name in ("rel_pos_h", "rel_pos_w"):
        assert params[f"backbone.blocks.3.attn.{name}"]["weight_decay"] == 0.0
    assert params["backbone.blocks.3.attn.qkv.weight"]["weight_decay"] == cfg.optimizer.weight_decay
