"""Every shipped backbone config, and a custom detectron2 ``Backbone``, plug into FocusDETR."""

from typing import Dict, List

import pytest
import torch
from backbone_helpers import (
    MODEL_CONFIGS,
    MODEL_PARAMS,
    load_model_config,
    requires_timm,
    shrink_transformer,
    tiny_model,
    tiny_swin,
)
from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.modeling import Backbone
from helpers import make_batched_inputs
from torch import nn

# (h, w): odd, not square, not multiples of any stride; boxes in the first image, none in the second
ODD_SIZES = ((97, 130), (120, 97))


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
    assert len(model.neck.in_features) + model.neck.num_extra_levels == 4
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
    assert names == list(model.neck.in_features) and strides == [8, 16, 32]


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
    model.neck.in_features = [f"c{level + 3}" for level in range(backbone_levels)]
    model.neck.num_extra_levels = extra_levels
    model.encoder.num_levels = model.decoder.num_levels = num_levels
    model.encoder.foreground_ranges = None  # the default ranges, for any number of levels
    shrink_transformer(model, num_levels=num_levels)
    torch.manual_seed(0)
    detector = instantiate(model)
    assert detector.strides == [2 ** (level + 3) for level in range(num_levels)]
    assert len(detector.encoder.foreground_loss.ranges) == num_levels
    check_train_and_eval(detector)


def test_inconsistent_levels_name_the_numbers():
    model = shrink_transformer(load_model_config("focus_detr_r50.py"), num_levels=5)
    model.backbone = L(ToyBackbone)(num_levels=3)
    model.neck.in_features = ["c3", "c4", "c5"]
    model.neck.num_extra_levels = 1
    model.encoder.foreground_ranges = None
    with pytest.raises(ValueError, match=r"encoder\.num_levels=5 .* gives 4 levels"):
        instantiate(model)


def test_unknown_feature_names_are_reported():
    model = shrink_transformer(load_model_config("focus_detr_swin_tiny.py"))
    tiny_swin(model.backbone)
    model.neck.in_features = ["res3", "res4", "res5"]
    with pytest.raises(ValueError, match=r"'res3'.*available: \['p1', 'p2', 'p3'\]"):
        instantiate(model)
