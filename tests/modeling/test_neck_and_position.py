"""The neck and the sine position embeddings, against hand-worked values."""

import math

import pytest
import torch
from detectron2.layers import ShapeSpec

from focus_detr.modeling.neck import MultiScaleNeck
from focus_detr.modeling.position_encoding import PositionEmbeddingSine, get_sine_pos_embed

SHAPES = {"a": ShapeSpec(channels=4, stride=8), "b": ShapeSpec(channels=6, stride=16)}


def test_neck_levels_strides_and_shapes():
    neck = MultiScaleNeck(
        input_shapes=SHAPES,
        in_features=["a", "b"],
        out_channels=8,
        num_extra_levels=2,
        num_groups=2,
    )
    assert neck.strides == [8, 16, 32, 64] and neck.num_levels == 4
    outputs = neck({"a": torch.randn(2, 4, 12, 10), "b": torch.randn(2, 6, 6, 5)})
    # 3x3 stride-2 convs with padding 1: 6x5 -> 3x3 -> 2x2
    assert [tuple(o.shape) for o in outputs] == [
        (2, 8, 12, 10),
        (2, 8, 6, 5),
        (2, 8, 3, 3),
        (2, 8, 2, 2),
    ]


def test_neck_projection_by_hand():
    neck = MultiScaleNeck(
        input_shapes={"a": ShapeSpec(channels=1, stride=8)},
        in_features=["a"],
        out_channels=2,
        num_extra_levels=0,
        num_groups=1,
    )
    with torch.no_grad():
        neck.projections[0][0].weight.copy_(torch.tensor([[[[2.0]]], [[[-1.0]]]]))
        neck.projections[0][0].bias.zero_()
    x = torch.tensor([[[[1.0, 3.0]]]])  # (1, 1, 1, 2)
    (out,) = neck({"a": x})
    # conv gives [[2, 6], [-1, -3]]; one GroupNorm group over all 4 values:
    # mean 1, variance (1 + 25 + 4 + 16) / 4 = 11.5
    values = torch.tensor([[2.0, 6.0], [-1.0, -3.0]])
    expected = (values - 1.0) / math.sqrt(11.5 + 1e-5)
    torch.testing.assert_close(out[0, :, 0], expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"in_features": ["c"]}, r"\['c'\]"),
        ({"in_features": ["b", "a"]}, "finest first"),
        ({"num_extra_levels": -1}, "-1"),
        ({"out_channels": 10, "num_groups": 4}, "num_groups=4"),
        ({"in_features": []}, "at least one"),
        ({"norm": "LN"}, "norm must be one of .*'LN'"),
    ],
)
def test_neck_validation(kwargs, message):
    arguments = dict(input_shapes=SHAPES, in_features=["a", "b"], out_channels=8, num_groups=2)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        MultiScaleNeck(**arguments)


def test_batch_norm_neck_of_rt_detr():
    # RT-DETR's input projection: per level a 1x1 conv without bias + BatchNorm, no extra level
    r50 = {
        name: ShapeSpec(channels=channels, stride=stride)
        for name, channels, stride in (("res3", 512, 8), ("res4", 1024, 16), ("res5", 2048, 32))
    }
    neck = MultiScaleNeck(
        input_shapes=r50, in_features=list(r50), out_channels=256, num_extra_levels=0, norm="BN"
    )
    assert neck.strides == [8, 16, 32]
    assert all(isinstance(projection[1], torch.nn.BatchNorm2d) for projection in neck.projections)
    assert all(projection[0].bias is None for projection in neck.projections)
    parameters = sum(p.numel() for p in neck.parameters())
    assert parameters == (512 + 1024 + 2048) * 256 + 3 * 2 * 256  # 919,040
    # no GroupNorm constraint on the channels; extra levels get a batch norm too
    neck = MultiScaleNeck(input_shapes=SHAPES, in_features=["a", "b"], out_channels=10, norm="BN")
    outputs = neck({"a": torch.randn(2, 4, 6, 5), "b": torch.randn(2, 6, 3, 3)})
    assert [tuple(o.shape) for o in outputs] == [(2, 10, 6, 5), (2, 10, 3, 3), (2, 10, 2, 2)]
    assert neck.extra_levels[0][0].bias is None


def test_position_embedding_by_hand():
    embedding = PositionEmbeddingSine(num_pos_feats=2, normalize=True)
    mask = torch.tensor([[[False, False, True]]])  # 1 row, 2 valid columns + padding
    pos = embedding(mask)
    assert pos.shape == (1, 4, 1, 3)
    # y: cumulative 1 over 1 valid row -> (1 - 0.5) / 1 * 2pi = pi; x: (1 - 0.5) / 2 * 2pi, ...
    y = math.pi
    x0, x1 = (0.5 / 2) * 2 * math.pi, (1.5 / 2) * 2 * math.pi
    # 2 features per axis: sin(v / 1), cos(v / 10000^(2 * 0 / 2)) = cos(v)
    expected_y = [math.sin(y), math.cos(y)]
    expected_x = [[math.sin(x0), math.cos(x0)], [math.sin(x1), math.cos(x1)]]
    torch.testing.assert_close(pos[0, :2, 0, 0], torch.tensor(expected_y), atol=1e-5, rtol=0)
    torch.testing.assert_close(pos[0, 2:, 0, 0], torch.tensor(expected_x[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(pos[0, 2:, 0, 1], torch.tensor(expected_x[1]), atol=1e-5, rtol=0)
    # float64 on request (model.double())
    assert embedding(mask, torch.float64).dtype == torch.float64


def test_box_sine_embedding_order_and_values():
    coordinates = torch.tensor([[0.25, 0.5, 0.1, 0.2]])
    embedded = get_sine_pos_embed(coordinates, num_pos_feats=2)
    assert embedded.shape == (1, 8)
    # (y, x, w, h) order, each (sin(2 pi v), cos(2 pi v))
    expected = []
    for v in (0.5, 0.25, 0.1, 0.2):
        expected += [math.sin(2 * math.pi * v), math.cos(2 * math.pi * v)]
    torch.testing.assert_close(embedded[0], torch.tensor(expected), atol=1e-5, rtol=0)
    assert get_sine_pos_embed(coordinates.double(), 2).dtype == torch.float64
