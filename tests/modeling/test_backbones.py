"""Every shipped backbone config, and a custom detectron2 ``Backbone``, plug into FocusDETR."""

import copy
import importlib.util
from typing import Callable, Dict, List, Optional

import numpy as np
import pytest
import torch
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.data import transforms as T
from detectron2.modeling import Backbone
from helpers import CONFIG_DIR, make_batched_inputs, shrink_model_config
from torch import nn

# (h, w): odd, not square, not multiples of any stride; boxes in the first image, none in the second
ODD_SIZES = ((97, 130), (120, 97))
HIDDEN = 32

# detectron2's ViT and MViT blocks import timm's Mlp, Swin its DropPath when drop path > 0.
requires_timm = pytest.mark.skipif(
    importlib.util.find_spec("timm") is None,
    reason="detectron2's ViT, MViT and Swin with drop path need timm (pip install timm)",
)


class ToyBackbone(Backbone):
    """
    A stride-4 stem, then ``num_levels`` 3x3 stride-2 conv stages; outputs "c3", "c4", ... at
    strides 8, 16, ... with ``width * 2**i`` channels. Written as a user's own backbone would be.
    """

    def __init__(self, *, num_levels: int = 3, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, kernel_size=7, stride=4, padding=3)
        self.stages = nn.ModuleList()
        self._out_features: List[str] = []
        self._out_feature_channels: Dict[str, int] = {}
        self._out_feature_strides: Dict[str, int] = {}
        in_channels = width
        for level in range(num_levels):
            channels = width * 2**level
            self.stages.append(
                nn.Sequential(nn.Conv2d(in_channels, channels, 3, stride=2, padding=1), nn.ReLU())
            )
            name = f"c{level + 3}"
            self._out_features.append(name)
            self._out_feature_channels[name] = channels
            self._out_feature_strides[name] = 2 ** (level + 3)
            in_channels = channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.stem(x)
        outputs = {}
        for name, stage in zip(self._out_features, self.stages):
            x = stage(x)
            outputs[name] = x
        return outputs


def shrink_transformer(model, num_levels: int = 4):
    """The tiny transformer of tests/helpers.py (the backbone kept as it is), ``num_levels``."""
    backbone = copy.deepcopy(model.backbone)
    shrink_model_config(model, hidden_dim=HIDDEN)
    model.backbone = backbone
    model.encoder.num_levels = model.decoder.num_levels = num_levels
    return model


# Backbone shrinkers. ResNet widths are not configurable: R50/R101 run at full size.
def _tiny_regnet(backbone):
    backbone.update(stem_width=8, depth=4, w_a=12.8, w_0=16, w_m=1.5, group_width=8)


def _tiny_swin(backbone):
    backbone.update(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), drop_path_rate=0.0)


def _tiny_vit(backbone):
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


def _tiny_mvit(backbone):
    backbone.update(
        embed_dim=16, depth=4, last_block_indexes=(0, 1, 2, 3), img_size=128, drop_path_rate=0.0
    )


MODEL_CONFIGS: Dict[str, Optional[Callable]] = {
    "focus_detr_r50.py": None,
    "focus_detr_r101.py": None,
    "focus_detr_regnety_4gf.py": _tiny_regnet,
    "focus_detr_swin_tiny.py": _tiny_swin,
    "focus_detr_swin_small.py": _tiny_swin,
    "focus_detr_swin_base_384.py": _tiny_swin,
    "focus_detr_swin_large_384.py": _tiny_swin,
    "focus_detr_vit_base.py": _tiny_vit,
    "focus_detr_mvitv2_tiny.py": _tiny_mvit,
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


def check_train_and_eval(model: nn.Module, sizes=ODD_SIZES) -> None:
    """A training step (finite losses, gradients reach the backbone) and an inference pass."""
    model.train()
    losses = model(make_batched_inputs(sizes))
    assert losses and all(torch.isfinite(value) for value in losses.values()), losses
    sum(losses.values()).backward()
    trainable = [p for p in model.backbone.parameters() if p.requires_grad]
    assert trainable and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())

    model.eval()
    with torch.no_grad():
        inputs = make_batched_inputs(sizes)
        results = model(inputs)
    assert len(results) == len(sizes)
    for result, image in zip(results, inputs):
        instances = result["instances"]
        assert instances.image_size == (image["height"], image["width"])
        assert len(instances) == model.num_select
        assert torch.isfinite(instances.pred_boxes.tensor).all()


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_backbone_config_trains_and_infers(name):
    model = tiny_model(name)
    # every shipped config: three backbone levels + one neck level, strides 8 to 64
    assert model.strides == [8, 16, 32, 64]
    assert model.encoder.num_levels == model.decoder.num_levels == 4
    check_train_and_eval(model)


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_full_size_config_levels_are_consistent(name):
    """The unshrunk configs: three backbone outputs at strides 8/16/32 + one level = 4."""
    model = load_model_config(name)
    assert len(model.in_features) + model.num_extra_levels == 4
    assert model.encoder.num_levels == model.decoder.num_levels == 4
    assert model.hidden_dim == 256 and model.query_selection.num_queries == 900
    backbone = model.backbone
    kind = backbone._target_.__name__
    if kind == "SimpleFeaturePyramid":  # names and strides follow from the scale factors
        strides = [int(16 / scale) for scale in backbone.scale_factors]
        names = [f"p{stride.bit_length() - 1}" for stride in strides]
        assert backbone.top_block is None and backbone.square_pad == 1024
    elif kind == "SwinTransformer":
        names = [f"p{i}" for i in backbone.out_indices]
        strides = [2 ** (i + 2) for i in backbone.out_indices]
    else:  # ResNet res3-5, RegNet s2-4, MViT scale3-5
        names, strides = list(backbone.out_features), [8, 16, 32]
    assert names == list(model.in_features) and strides == [8, 16, 32]


@requires_timm
def test_vit_square_padding_is_honoured():
    model = tiny_model("focus_detr_vit_base.py")
    images = model.preprocess_image(make_batched_inputs(ODD_SIZES))
    assert tuple(images.tensor.shape[-2:]) == (160, 160)
    assert [tuple(size) for size in images.image_sizes] == list(ODD_SIZES)
    # larger images cannot be padded to the square (a single one would be cropped silently)
    with pytest.raises(ValueError, match="square_size=160"):
        model.preprocess_image(make_batched_inputs([(97, 161)]))


@pytest.mark.parametrize("backbone_levels, extra_levels", [(3, 0), (3, 1), (4, 0), (5, 0)])
def test_custom_backbone_plugs_in_through_config(backbone_levels, extra_levels):
    """A user-defined Backbone replaces the ResNet through the config alone, 3 to 5 levels."""
    model = load_model_config("focus_detr_r50.py")
    num_levels = backbone_levels + extra_levels
    # the lines of docs/backbones.md
    model.backbone = L(ToyBackbone)(num_levels=backbone_levels, width=8)
    model.in_features = [f"c{level + 3}" for level in range(backbone_levels)]
    model.num_extra_levels = extra_levels
    model.encoder.num_levels = model.decoder.num_levels = num_levels
    model.foreground_ranges = None  # the default ranges, for any number of levels
    shrink_transformer(model, num_levels=num_levels)
    torch.manual_seed(0)
    detector = instantiate(model)
    assert detector.strides == [2 ** (level + 3) for level in range(num_levels)]
    assert len(detector.foreground_ranges) == num_levels
    check_train_and_eval(detector)


def test_inconsistent_levels_name_the_numbers():
    model = shrink_transformer(load_model_config("focus_detr_r50.py"), num_levels=5)
    model.backbone = L(ToyBackbone)(num_levels=3)
    model.in_features = ["c3", "c4", "c5"]
    model.num_extra_levels = 1
    with pytest.raises(ValueError, match=r"encoder\.num_levels=5 .* give 4 levels"):
        instantiate(model)


def test_unknown_feature_names_are_reported():
    model = shrink_transformer(load_model_config("focus_detr_swin_tiny.py"))
    _tiny_swin(model.backbone)
    model.in_features = ["res3", "res4", "res5"]
    with pytest.raises(ValueError, match=r"'res3'.*available: \['p1', 'p2', 'p3'\]"):
        instantiate(model)


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
