"""
Tiny Focus-DETR models, inputs and training configs shared by the tests.

The model is the R50 config of ``configs/common/models/focus_detr_r50.py`` shrunk to a ResNet-18,
32 channels, 2 + 2 layers and 20 queries: every part of the real model runs (foreground token
selector, cascade sparsification, dual attention, two-stage queries, denoising, auxiliary losses)
in well under a second per step on small images.
"""

import importlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.data import transforms as T
from detectron2.engine import default_argument_parser
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm

from focus_detr.data import CLASS_NAMES, prepare_synthetic_shapes, register_synthetic_shapes

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
R50_MODEL_CONFIG = CONFIG_DIR / "common" / "models" / "focus_detr_r50.py"
DEMO_CONFIG = CONFIG_DIR / "focus_detr_demo_shapes.py"

# Heights and widths that differ by one pixel: the batch is padded and one image has padding.
ODD_SIZES = ((200, 250), (200, 249))


def shrink_model_config(model, *, num_classes: Optional[int] = 3, hidden_dim: int = 32):
    """
    Shrink a Focus-DETR model config node (R50 layout) in place to a tiny model.

    The backbone becomes a ResNet-18 when it is the ResNet of the R50 config; the transformer
    gets ``hidden_dim`` channels, 4 heads, 2 points, 2 + 2 layers, 20 queries and 6 denoising
    queries. The encoder gets only the sizes it has (RT-DETR's hybrid encoder: 4 heads, FFN
    2 * hidden_dim, 2 RepVGG blocks per CSP layer). ``num_classes=None`` keeps the config's
    classes.
    """
    stages = model.backbone.get("stages")
    if stages is not None and "depth" in stages:
        stages.depth = 18
        # BasicBlock (depth 18/34) has no stride_in_1x1
        stages.pop("stride_in_1x1", None)
    if num_classes is not None:
        model.num_classes = num_classes
    model.hidden_dim = hidden_dim
    if "num_groups" in model.neck:
        model.neck.num_groups = 8
    model.num_select = 10
    encoder = model.encoder
    # only the sizes this kind of encoder has
    tiny_encoder = {
        "num_heads": 4,
        "num_points": 2,
        "ffn_dim": 2 * hidden_dim,
        "num_layers": 2,
        "layer_keep_factors": (1.0, 0.5),
        "topk_sa": 16,
        "keep_ratio": 0.5,
        "low_ffn_dim": hidden_dim,
        "high_updates_per_block": 2,
        "num_blocks": 2,
    }
    for key, value in tiny_encoder.items():
        if key in encoder:
            encoder[key] = value
    decoder = model.decoder
    decoder.num_layers = 2
    decoder.num_heads = 4
    decoder.num_points = 2
    decoder.feedforward_dim = 2 * hidden_dim
    model.query_selection.num_queries = 20
    model.denoising.dn_number = 6
    return model


# the R50 model configs of the encoders compared on one decoder
ENCODER_MODEL_CONFIGS = {
    "focus": R50_MODEL_CONFIG,
    "dense": CONFIG_DIR / "common" / "models" / "dino_r50.py",
    "sparse": CONFIG_DIR / "common" / "models" / "sparse_detr_r50.py",
    "lite": CONFIG_DIR / "common" / "models" / "lite_detr_r50.py",
    "hybrid": CONFIG_DIR / "common" / "models" / "rtdetr_hybrid_r50.py",
}


def tiny_model_config(*, num_classes: int = 3, hidden_dim: int = 32, encoder: str = "focus"):
    """
    The LazyConfig node of a tiny two-stage DETR (see :func:`shrink_model_config`) with the
    ``encoder`` of :data:`ENCODER_MODEL_CONFIGS` ("focus", "dense", "sparse", "lite" or
    "hybrid"), or "lite_key_aware": Lite DETR with key-aware attention in the encoder and the
    decoder's cross-attention, as ``configs/lite_detr_r50_keyaware_4scale_12ep.py``.
    """
    key_aware = encoder == "lite_key_aware"
    model = shrink_model_config(
        LazyConfig.load(str(ENCODER_MODEL_CONFIGS["lite" if key_aware else encoder])).model,
        num_classes=num_classes,
        hidden_dim=hidden_dim,
    )
    if key_aware:
        model.encoder.key_aware = model.decoder.key_aware = True
    return model


def build_tiny_model(*, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A tiny Focus-DETR with reproducible initial weights; kwargs go to tiny_model_config."""
    torch.manual_seed(seed)
    return instantiate(tiny_model_config(**kwargs))


def make_features(
    level_shapes: Sequence[Tuple[int, int]] = ((8, 8), (4, 4)),
    *,
    batch: int = 2,
    channels: int = 32,
    image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
    strides: Optional[Sequence[int]] = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """
    :class:`FlattenedFeatures` of random maps with the given level shapes, built the way the
    meta-architecture builds them. The padded input is ``level_shapes[0] * strides[0]`` pixels;
    ``image_sizes`` (default: the whole padded size for every image) set the padding.
    """
    from focus_detr.modeling.multi_scale import flatten_levels, level_padding_masks
    from focus_detr.modeling.position_encoding import PositionEmbeddingSine

    generator = torch.Generator().manual_seed(seed)
    strides = list(strides or [8 * 2**level for level in range(len(level_shapes))])
    padded = (level_shapes[0][0] * strides[0], level_shapes[0][1] * strides[0])
    image_sizes = list(image_sizes or [padded] * batch)
    maps = [
        torch.randn(batch, channels, h, w, generator=generator, dtype=dtype)
        for h, w in level_shapes
    ]
    masks = level_padding_masks(image_sizes, padded, level_shapes, torch.device("cpu"))
    embedding = PositionEmbeddingSine(num_pos_feats=channels // 2)
    positions = [embedding(mask, dtype) for mask in masks]
    level_embed = torch.randn(len(level_shapes), channels, generator=generator, dtype=dtype)
    return flatten_levels(
        maps,
        masks,
        positions,
        level_embed,
        strides=strides,
        padded_size=padded,
        image_sizes=image_sizes,
    )


def make_instances(
    image_size: Tuple[int, int], boxes: Sequence[Sequence[float]], classes=None
) -> Instances:
    """Ground truth of one image: absolute XYXY ``boxes`` (may be empty), class 0 by default."""
    instances = Instances(image_size)
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    if classes is None:
        classes = [0] * len(boxes)
    instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return instances


def make_image(height: int, width: int, *, seed: int = 0) -> torch.Tensor:
    """A (3, H, W) uint8 image, as detectron2's DatasetMapper produces."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def make_batched_inputs(
    sizes: Sequence[Tuple[int, int]] = ODD_SIZES,
    boxes: Optional[Sequence[Sequence[Sequence[float]]]] = None,
    *,
    original_scale: float = 2.0,
    seed: int = 0,
) -> List[Dict]:
    """
    Dataset-mapper dicts for images of ``sizes`` (h, w).

    Args:
        boxes: per image a list of absolute XYXY boxes in the input image (an empty list gives an
            image without objects). Default: two boxes in the first image, none in the others.
        original_scale: ``height``/``width`` (the original image size the predictions are scaled
            to) are the input size times this.
    """
    if boxes is None:
        h, w = sizes[0]
        first = [[0.05 * w, 0.1 * h, 0.5 * w, 0.75 * h], [0.2 * w, 0.25 * h, 0.95 * w, 0.9 * h]]
        boxes = [first] + [[] for _ in sizes[1:]]
    inputs = []
    for index, ((height, width), image_boxes) in enumerate(zip(sizes, boxes)):
        inputs.append(
            {
                "image": make_image(height, width, seed=seed + index),
                "instances": make_instances((height, width), image_boxes),
                "height": round(height * original_scale),
                "width": round(width * original_scale),
            }
        )
    return inputs


def register_tiny_shapes(
    root, name_prefix: str, *, num_train: int = 4, num_val: int = 2, seed: int = 0
) -> Dict[str, str]:
    """
    Register and generate a synthetic shapes dataset of 64..96 pixel images under ``root``.
    Returns ``{"train": name, "val": name}``.
    """
    names = register_synthetic_shapes(
        os.fspath(root),
        num_train=num_train,
        num_val=num_val,
        seed=seed,
        min_size=64,
        max_size=96,
        max_objects=3,
        empty_fraction=0.0,
        name_prefix=name_prefix,
    )
    # COCOEvaluator reads the val JSON in its constructor: generate the files now.
    prepare_synthetic_shapes(*names.values())
    return names


def tiny_train_config(
    output_dir,
    dataset_names: Dict[str, str],
    *,
    max_iter: int = 2,
    batch_size: int = 2,
    image_size: int = 64,
    seed: int = 0,
    flip: bool = False,
):
    """
    The demo config (configs/focus_detr_demo_shapes.py) with the tiny model, the datasets of
    :func:`register_tiny_shapes`, a fixed resize to ``image_size`` (after a random flip when
    ``flip``), no loader workers and no aspect-ratio grouping: the training batches depend on
    the sampler and the random states only, which makes runs reproducible and resumable.
    Evaluation and a checkpoint at ``max_iter``, metrics written every iteration.
    """
    cfg = LazyConfig.load(str(DEMO_CONFIG))
    shrink_model_config(cfg.model, num_classes=len(CLASS_NAMES))
    resize = L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size)
    train_loader = cfg.dataloader.train
    train_loader.dataset.names = dataset_names["train"]
    train_loader.mapper.augmentations = [L(T.RandomFlip)(), resize] if flip else [resize]
    train_loader.total_batch_size = batch_size
    train_loader.num_workers = 0
    train_loader.aspect_ratio_grouping = False
    test_loader = cfg.dataloader.test
    test_loader.dataset.names = dataset_names["val"]
    test_loader.mapper.augmentations = [resize]
    test_loader.num_workers = 0
    cfg.train.output_dir = os.fspath(output_dir)
    cfg.train.device = "cpu"
    # fixed float32: "auto" depends on the CPU, and seeded runs must reproduce exactly
    cfg.train.amp.enabled = False
    cfg.train.seed = seed
    cfg.train.max_iter = max_iter
    cfg.train.eval_period = max_iter
    cfg.train.log_period = 1
    cfg.train.checkpointer.period = max_iter
    cfg.lr_multiplier.warmup_length = 0.0
    return cfg


def import_train_net():
    """
    Import the repository's train_net.py as the module ``train_net`` (the repository root is on
    the path through pyproject.toml's pytest ``pythonpath``, in spawned processes too).
    """
    return importlib.import_module("train_net")


def train_net_worker(dataset_root: str, name_prefix: str, argv: Sequence[str]) -> None:
    """
    Body of one process of a multi-process test: ``launch`` spawns fresh interpreters, which
    do not know the test's datasets. Registers the tiny shapes datasets of
    :func:`register_tiny_shapes` (default sizes; the files exist, nothing is generated), runs
    ``train_net.main`` on ``argv``, and saves this process's final model parameters, rank and
    world size to ``{train.output_dir}/rank{rank}.pth``.
    """
    # two processes on two cores: one thread each, or OpenMP threads fight over the cores
    torch.set_num_threads(1)
    register_tiny_shapes(dataset_root, name_prefix)
    built = []
    train_net = import_train_net()
    build_model = train_net.build_model

    def recording_build_model(cfg):
        built.append(build_model(cfg))
        return built[-1]

    train_net.build_model = recording_build_model
    args = default_argument_parser().parse_args(list(argv))
    train_net.main(args)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    torch.save(
        {
            "rank": comm.get_rank(),
            "world_size": comm.get_world_size(),
            "parameters": {k: v.detach().clone() for k, v in built[-1].named_parameters()},
        },
        os.path.join(cfg.train.output_dir, f"rank{comm.get_rank()}.pth"),
    )


def read_metrics(output_dir):
    """The records of ``metrics.json`` written by detectron2's JSONWriter."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


# EMA settings of the engine tests: a strong pull, no warm-up, so two iterations show it.
TEST_EMA = dict(enabled=True, decay=0.5, warmup=0)
