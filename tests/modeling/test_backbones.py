"""Every shipped backbone config, and a custom detectron2 ``Backbone``, plug into FocusDETR."""

from typing import Dict, List

import pytest
import torch
from backbone_helpers import (
    HIDDEN,
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

from focus_detr.modeling import MultiScaleNeck, neck_from_backbone

# (h, w): odd, not square, not multiples of any stride; boxes in the first image, none in the second
ODD_SIZES = ((97, 130), (120, 97))


class ToyBackbone(Backbone):
    """
    A stride-4 stem, then ``num_levels`` 3x3 stride-2 conv stages; outputs "c3", "c4", ... at
    strides 8, 16, ... with ``width * 2**i`` channels (``width`` for all when not
    ``widening``). Written as a user's own backbone would be.
    """

    def __init__(self, *, num_levels: int = 3, width: int = 8, widening: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(3, width, kernel_size=7, stride=4, padding=3)
        self.stages = nn.ModuleList()
        self._out_features: List[str] = []
        self._out_feature_channels: Dict[str, int] = {}
        self._out_feature_strides: Dict[str, int] = {}
        in_channels = width
        for level in range(num_levels):
            channels = width * 2**level if widening else width
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
    model.decoder.num_levels = num_levels  # the encoder follows
    model.encoder.foreground_ranges = None  # the default ranges, for any number of levels
    shrink_transformer(model)
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


class ToyNeck(nn.Module):
    """A user's own neck: one 1x1 conv per backbone output, no extra level."""

    def __init__(self, *, input_shapes, out_channels: int):
        super().__init__()
        self.names = sorted(input_shapes, key=lambda name: input_shapes[name].stride)
        self.strides = [input_shapes[name].stride for name in self.names]
        self.out_channels = out_channels
        self.convs = nn.ModuleList(
            nn.Conv2d(input_shapes[name].channels, out_channels, 1) for name in self.names
        )

    def forward(self, features):
        return [conv(features[name]) for conv, name in zip(self.convs, self.names)]


def _toy_model(num_levels: int, **backbone):
    model = shrink_transformer(load_model_config("focus_detr_r50.py"), num_levels=num_levels)
    model.backbone = L(ToyBackbone)(num_levels=num_levels, **backbone)
    model.encoder.foreground_ranges = None
    return model


def test_without_a_neck_the_backbone_feeds_the_encoder():
    model = _toy_model(4, width=HIDDEN, widening=False)
    model.neck = None
    torch.manual_seed(0)
    detector = instantiate(model)
    assert detector.neck is None and detector.strides == [8, 16, 32, 64]
    assert not any(name.startswith("neck.") for name in detector.state_dict())
    check_train_and_eval(detector)


def test_without_a_neck_the_channels_must_be_hidden_dim():
    model = _toy_model(3, width=8)
    model.neck = None
    with pytest.raises(ValueError, match=r"hidden_dim=32 channels, got \{'c3': 8, 'c4': 16"):
        instantiate(model)


def test_a_config_replaces_the_neck():
    model = _toy_model(4, width=8)
    model.neck = L(neck_from_backbone)(neck_class=ToyNeck, out_channels="${..hidden_dim}")
    torch.manual_seed(0)
    detector = instantiate(model)
    assert isinstance(detector.neck, ToyNeck) and detector.strides == [8, 16, 32, 64]
    check_train_and_eval(detector)
    # a built module is taken as it is; its width must be the transformer's
    model.neck = ToyNeck(input_shapes=ToyBackbone(num_levels=4).output_shape(), out_channels=16)
    with pytest.raises(ValueError, match="out_channels=16 but hidden_dim=32"):
        instantiate(model)


def test_the_default_neck_is_built_from_the_backbone_with_its_checkpoint_names():
    model = tiny_model("focus_detr_r50.py")
    assert isinstance(model.neck, MultiScaleNeck) and model.strides == [8, 16, 32, 64]
    names = {name for name in model.state_dict() if name.startswith("neck.")}
    assert names == {
        f"neck.{part}.{index}.{layer}.{tensor}"
        for part, count in (("projections", 3), ("extra_levels", 1))
        for index in range(count)
        for layer in (0, 1)
        for tensor in ("weight", "bias")
    }
