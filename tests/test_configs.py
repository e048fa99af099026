"""The LazyConfig files of configs/: load, save to YAML and reload, instantiate (shrunk)."""

import os
import re

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import BoxMode
from helpers import CONFIG_DIR, make_image, register_tiny_shapes, shrink_model_config
from PIL import Image

from focus_detr.data import CLASS_NAMES
from focus_detr.data.transforms import RandomChoice
from focus_detr.modeling import FocusDETR

pytestmark = pytest.mark.usefixtures("single_thread")

# Configs of other backbones (RegNet, Swin, ViT, ...) are tested by their authors: this file only
# knows how to shrink the ResNet configs and the demo.
_CONFIG_NAME = re.compile(
    r"^(focus_detr|dino|sparse_detr|lite_detr|rtdetr_hybrid)_"
    r"(r50_(\w+_)?[34]scale_\d+ep|r101_4scale_\d+ep|demo_\w+)\.py$"
)
CONFIG_FILES = sorted(name for name in os.listdir(CONFIG_DIR) if _CONFIG_NAME.match(name))
COCO_CONFIGS = [name for name in CONFIG_FILES if "demo" not in name]
ITERS_PER_EPOCH = 7500  # 16-image batches in one COCO epoch
# epochs -> epoch of the x0.1 LR decay (the Focus-DETR schedules: 12 ep at 11, 24 at 20, 36 at 30)
COCO_SCHEDULES = {12: 11, 24: 20, 36: 30}


def _load(name):
    return LazyConfig.load(str(CONFIG_DIR / name))


ENCODER_CONFIGS = {
    "focus": "focus_detr_{}.py",
    "dense": "dino_{}.py",
    "sparse": "sparse_detr_{}.py",
    "lite": "lite_detr_{}.py",
}


@pytest.mark.parametrize("variant", ["r50_4scale_12ep", "demo_shapes"])
def test_encoder_configs_differ_only_in_the_encoder(variant):
    """The comparison is fair: data, schedule, backbone, decoder and losses are shared."""
    focus = _load(ENCODER_CONFIGS["focus"].format(variant))
    for kind, pattern in ENCODER_CONFIGS.items():
        other = _load(pattern.format(variant))
        for cfg in (focus, other):
            cfg.model.pop("encoder")
            cfg.train.output_dir = "./output"
        assert LazyConfig.to_py(other) == LazyConfig.to_py(focus), kind
        focus = _load(ENCODER_CONFIGS["focus"].format(variant))


@pytest.mark.parametrize(
    "hybrid, focus", [("r50_3scale_12ep", "r50_4scale_12ep"), ("demo_shapes", "demo_shapes")]
)
def test_hybrid_configs_differ_in_the_encoder_neck_and_level_count(hybrid, focus):
    """RT-DETR's design on the shared model: its encoder, its input projection as the neck (batch
    norm, no extra level) and 3 levels in the decoder; data, schedule and the rest are shared."""
    hybrid_cfg = _load(f"rtdetr_hybrid_{hybrid}.py")
    focus_cfg = _load(ENCODER_CONFIGS["focus"].format(focus))
    model = hybrid_cfg.model
    assert model.encoder._target_.__name__ == "HybridEncoder"
    assert model.neck.norm in ("BN", "SyncBN") and model.neck.num_extra_levels == 0
    assert "num_groups" not in model.neck and model.encoder.norm == model.neck.norm
    assert model.decoder.num_levels == model.encoder.num_levels == 3
    if hybrid.startswith("r50"):
        # RT-DETR's R50 settings and behaviour
        assert model.encoder.ffn_dim == 1024 and model.encoder.num_heads == 8
        assert (model.encoder.position_layout, model.encoder.padding) == ("column_major", "visible")
    for cfg in (hybrid_cfg, focus_cfg):
        cfg.model.pop("encoder")
        for key in ("norm", "num_extra_levels", "num_groups"):
            cfg.model.neck.pop(key, None)
        cfg.model.decoder.pop("num_levels")
        cfg.train.output_dir = "./output"
    assert LazyConfig.to_py(hybrid_cfg) == LazyConfig.to_py(focus_cfg)


@pytest.mark.parametrize(
    "variant, parent, changes",
    [
        (
            "sparse_detr_r50_rho30_4scale_12ep.py",
            "sparse_detr_r50_4scale_12ep.py",
            {("encoder", "keep_ratio"): 0.3},
        ),
        (
            # Lite DETR's key_aware makes the decoder's cross-attention key-aware too
            "lite_detr_r50_keyaware_4scale_12ep.py",
            "lite_detr_r50_4scale_12ep.py",
            {("encoder", "key_aware"): True, ("decoder", "key_aware"): True},
        ),
    ],
)
def test_encoder_variants_change_only_their_values(variant, parent, changes):
    """The variants of the four-way comparison differ from their parent config only there."""
    child, base = _load(variant), _load(parent)
    for (part, key), value in changes.items():
        assert child.model[part][key] == value != base.model[part].get(key, False)
        for cfg in (child, base):
            cfg.model[part].pop(key, None)
    for cfg in (child, base):
        cfg.train.output_dir = "./output"
    assert LazyConfig.to_py(child) == LazyConfig.to_py(base)


def test_lite_key_aware_config_is_key_aware_in_encoder_and_decoder():
    """Where Lite DETR's code is key-aware with key_aware=True: every encoder layer and every
    decoder cross-attention; the plain config uses plain deformable attention throughout."""
    from focus_detr.layers import KeyAwareDeformableAttention, MultiScaleDeformableAttention

    for name, expected in (
        ("lite_detr_r50_keyaware_4scale_12ep.py", KeyAwareDeformableAttention),
        ("lite_detr_r50_4scale_12ep.py", MultiScaleDeformableAttention),
    ):
        model = _load(name).model
        shrink_model_config(model)
        model = instantiate(model)
        attentions = [layer.deformable_attn for layer in model.encoder.layers]
        attentions += [layer.cross_attn for layer in model.decoder.layers]
        assert all(type(attention) is expected for attention in attentions), name


@pytest.mark.parametrize("name", [n for n in COCO_CONFIGS if re.search(r"_(24|36)ep\.py$", n)])
def test_longer_schedules_are_the_12_epoch_config_with_another_schedule(name):
    twelve = re.sub(r"_\d+ep\.py$", "_12ep.py", name)
    assert f"from .{twelve[:-3]} import" in (CONFIG_DIR / name).read_text(), "not inherited"
    longer, base = _load(name), _load(twelve)
    epochs = int(re.search(r"_(\d+)ep\.py$", name).group(1))
    assert longer.train.max_iter == epochs / 12 * base.train.max_iter
    assert longer.lr_multiplier.scheduler.milestones[-1] == longer.train.max_iter
    for cfg in (longer, base):
        cfg.pop("lr_multiplier")
        cfg.train.pop("max_iter")
        cfg.train.output_dir = "./output"
    assert LazyConfig.to_py(longer) == LazyConfig.to_py(base)


def test_all_expected_configs_are_found():
    expected = {f"focus_detr_{d}_4scale_{e}ep.py" for d in ("r50", "r101") for e in (12, 24, 36)}
    assert expected <= set(CONFIG_FILES)
    assert "focus_detr_demo_shapes.py" in CONFIG_FILES


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_loads_with_every_section(name):
    cfg = _load(name)
    assert {"model", "optimizer", "lr_multiplier", "train", "dataloader"} <= set(cfg)
    assert {"train", "test", "evaluator"} <= set(cfg.dataloader)
    assert cfg.train.clip_grad.enabled and cfg.train.clip_grad.max_norm == 0.1
    # encoder, decoder and neck agree on the number of levels
    levels = len(cfg.model.neck.in_features) + cfg.model.neck.num_extra_levels
    assert cfg.model.encoder.num_levels == cfg.model.decoder.num_levels == levels
    # the level count is set once: the encoder follows the decoder's
    cfg.model.decoder.num_levels = levels + 1
    assert cfg.model.encoder.num_levels == levels + 1


@pytest.mark.parametrize("name", COCO_CONFIGS)
def test_coco_config_schedule_and_backbone(name):
    match = re.match(r"\w+_r(\d+)_(?:\w+_)?[34]scale_(\d+)ep\.py", name)
    depth, epochs = int(match.group(1)), int(match.group(2))
    cfg = _load(name)
    assert cfg.model.backbone.stages.depth == depth
    assert cfg.train.init_checkpoint.endswith(f"R-{depth}.pkl")
    assert cfg.train.max_iter == epochs * ITERS_PER_EPOCH
    milestones = list(cfg.lr_multiplier.scheduler.milestones)
    assert milestones == [COCO_SCHEDULES[epochs] * ITERS_PER_EPOCH, epochs * ITERS_PER_EPOCH]
    assert list(cfg.lr_multiplier.scheduler["values"]) == [1.0, 0.1]
    assert cfg.model.num_classes == 80
    assert cfg.dataloader.train.total_batch_size == 16


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_yaml_round_trip(name, tmp_path):
    cfg = _load(name)
    first = tmp_path / "config.yaml"
    LazyConfig.save(cfg, str(first))
    # LazyConfig.save falls back to a pickle next to the YAML when the YAML cannot be reloaded
    assert not os.path.exists(f"{first}.pkl"), "the config holds something YAML cannot hold"
    reloaded = LazyConfig.load(str(first))
    second = tmp_path / "reloaded.yaml"
    LazyConfig.save(reloaded, str(second))
    assert second.read_text() == first.read_text()
    factor_func = reloaded.optimizer.params.lr_factor_func
    assert factor_func("backbone.res3.conv1.weight") == cfg.optimizer.params.lr_factor_func(
        "backbone.res3.conv1.weight"
    )
    assert factor_func("decoder.layers.0.norm1.weight") == 1.0
    _instantiate_tiny(reloaded)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_instantiates_with_tiny_overrides(name):
    cfg = _load(name)
    backbone_factor = cfg.optimizer.params.lr_factor_func.keywords["factor"]
    # pretrained backbones train at 0.1x; the demo's backbone is trained from scratch
    assert backbone_factor == (0.1 if name in COCO_CONFIGS else 1.0)
    model, optimizer, scheduler = _instantiate_tiny(cfg)
    expected_classes = 80 if name in COCO_CONFIGS else len(CLASS_NAMES)
    assert model.num_classes == expected_classes

    names = {id(p): n for n, p in model.named_parameters()}
    base_lr = cfg.optimizer.lr
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            name_ = names[id(parameter)]
            expected = base_lr * (backbone_factor if name_.startswith("backbone.") else 1.0)
            assert group["lr"] == pytest.approx(expected), name_
            if "norm" in name_ and name_.endswith(".weight"):
                assert group["weight_decay"] == 0.0, name_
    assert scheduler(0.0) == pytest.approx(1.0 if cfg.lr_multiplier.warmup_length == 0 else 0.001)
    assert scheduler(0.999) == pytest.approx(0.1)

    model.eval()
    with torch.no_grad():
        (output,) = model([{"image": make_image(64, 80)}])
    assert output["instances"].image_size == (64, 80)
    assert (output["instances"].pred_classes < expected_classes).all()


def _instantiate_tiny(cfg):
    shrink_model_config(cfg.model, num_classes=None)
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    assert isinstance(model, FocusDETR)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    assert isinstance(optimizer, torch.optim.AdamW)
    return model, optimizer, instantiate(cfg.lr_multiplier)


def _coco_style_record(tmp_path, height=120, width=160):
    path = tmp_path / "image.png"
    pixels = make_image(height, width).permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(path)
    box = [10.0, 20.0, 80.0, 100.0]
    return {
        "file_name": str(path),
        "height": height,
        "width": width,
        "image_id": 0,
        "annotations": [
            {"bbox": box, "bbox_mode": BoxMode.XYXY_ABS, "category_id": 3, "iscrowd": 0}
        ],
    }


@pytest.mark.parametrize("name", COCO_CONFIGS)
def test_coco_mappers_and_augmentations(name, tmp_path):
    # Only the mappers: the COCO images are not on disk.
    cfg = _load(name)
    train_mapper = instantiate(cfg.dataloader.train.mapper)
    test_mapper = instantiate(cfg.dataloader.test.mapper)
    assert isinstance(train_mapper, DatasetMapper) and train_mapper.is_train
    augs = train_mapper.augmentations.augs
    assert [type(a) for a in augs] == [T.RandomFlip, RandomChoice]
    assert len(augs[1].choices) == 2

    record = _coco_style_record(tmp_path)
    np.random.seed(0)
    short_sides = set()
    for _ in range(6):
        mapped = train_mapper(dict(record))
        height, width = mapped["image"].shape[1:]
        assert min(height, width) in range(480, 801, 32) and max(height, width) <= 1333
        boxes = mapped["instances"].gt_boxes.tensor
        assert len(boxes) == 1 and mapped["instances"].gt_classes.tolist() == [3]
        assert (boxes[:, 2:] <= torch.tensor([width, height])).all()
        short_sides.add(min(height, width))
    assert len(short_sides) > 1, "the multi-scale resize always picked the same size"

    mapped = test_mapper(dict(record))
    assert tuple(mapped["image"].shape[1:]) == (800, 1067)
    assert "instances" not in mapped


def test_demo_dataloaders_and_evaluator_on_tiny_shapes(tmp_path):
    cfg = _load("focus_detr_demo_shapes.py")
    # the config names datasets that importing focus_detr.data registered
    assert cfg.dataloader.train.dataset.names in DatasetCatalog.list()
    assert cfg.dataloader.test.dataset.names in DatasetCatalog.list()

    names = register_tiny_shapes(tmp_path / "shapes", f"test_configs_{os.getpid()}")
    cfg.dataloader.train.dataset.names = names["train"]
    cfg.dataloader.train.total_batch_size = 2
    cfg.dataloader.train.num_workers = 0
    cfg.dataloader.test.dataset.names = names["val"]
    cfg.dataloader.test.num_workers = 0
    cfg.train.output_dir = str(tmp_path / "output")

    batch = next(iter(instantiate(cfg.dataloader.train)))
    assert len(batch) == 2
    for item in batch:
        # the demo trains at a long side of 192 pixels
        assert max(item["image"].shape[1:]) == 192
        assert len(item["instances"]) > 0
    (item,) = next(iter(instantiate(cfg.dataloader.test)))
    assert max(item["image"].shape[1:]) == 192
    assert max(item["height"], item["width"]) <= 96

    evaluator = instantiate(cfg.dataloader.evaluator)
    assert isinstance(evaluator, COCOEvaluator)
    assert evaluator._output_dir == cfg.train.output_dir
