"""Padding masks, valid ratios, flattening, proposals and reference points, by hand."""

import math

import helpers
import pytest
import torch

from focus_detr.modeling import FlattenedFeatures
from focus_detr.modeling.multi_scale import (
    encoder_reference_points,
    flatten_levels,
    generate_proposals,
    image_sizes_tensor,
    level_padding_masks,
    valid_ratios,
    valid_token_counts,
)


def test_padding_masks_by_hand():
    # a 32x32 padded batch; image 1 is 13 high and 20 wide
    masks = level_padding_masks([(32, 32), (13, 20)], (32, 32), [(4, 4), (2, 2)], "cpu")
    assert [tuple(m.shape) for m in masks] == [(2, 4, 4), (2, 2, 2)]
    assert not masks[0][0].any() and not masks[1][0].any()
    # level 0 (stride 8): valid rows ceil(13 * 4 / 32) = 2, valid columns ceil(20 * 4 / 32) = 3
    expected = torch.ones(4, 4, dtype=torch.bool)
    expected[:2, :3] = False
    assert torch.equal(masks[0][1], expected)
    # level 1 (stride 16): ceil(13 * 2 / 32) = 1 row, ceil(20 * 2 / 32) = 2 columns
    assert masks[1][1].tolist() == [[False, False], [True, True]]


def test_padding_masks_keep_one_cell_of_tiny_images():
    masks = level_padding_masks([(1, 1)], (64, 64), [(8, 8), (1, 1)], "cpu")
    assert (~masks[0][0]).sum() == 1 and not masks[0][0, 0, 0]
    assert not masks[1][0, 0, 0]


def test_image_sizes_as_tensors_like_under_tracing():
    sizes = [torch.tensor([13, 20]), torch.tensor([32, 32])]
    assert image_sizes_tensor(sizes, "cpu").tolist() == [[13, 20], [32, 32]]
    as_ints = level_padding_masks([(13, 20), (32, 32)], (32, 32), [(4, 4)], "cpu")
    as_tensors = level_padding_masks(sizes, (32, 32), [(4, 4)], "cpu")
    assert torch.equal(as_ints[0], as_tensors[0])
    assert valid_token_counts(sizes, (32, 32), [(4, 4)]) == (6, 16)


@pytest.mark.parametrize("padded_size", [(32, 32), (64, 96), (800, 1216), (224, 224)])
def test_valid_token_counts_are_those_of_the_padding_masks(padded_size):
    # Python arithmetic against the masks' float64 arithmetic, at many image sizes and levels
    generator = torch.Generator().manual_seed(0)
    pad_h, pad_w = padded_size
    level_shapes = [(-(-pad_h // stride), -(-pad_w // stride)) for stride in (8, 16, 32, 64)]
    heights = torch.randint(1, pad_h + 1, (40,), generator=generator).tolist()
    widths = torch.randint(1, pad_w + 1, (40,), generator=generator).tolist()
    sizes = list(zip(heights, widths)) + [(1, 1), (pad_h, pad_w), (pad_h, 1)]
    masks = level_padding_masks(sizes, padded_size, level_shapes, "cpu")
    counted = sum((~mask).flatten(1).sum(dim=1) for mask in masks).tolist()
    assert list(valid_token_counts(sizes, padded_size, level_shapes)) == counted


def test_valid_ratios_by_hand():
    mask = torch.ones(1, 4, 5, dtype=torch.bool)
    mask[0, :3, :2] = False
    ratios = valid_ratios(mask, torch.float64)
    assert ratios.dtype == torch.float64
    assert ratios.tolist() == [[2 / 5, 3 / 4]]


def test_proposals_by_hand():
    masks = [torch.zeros(1, 2, 2, dtype=torch.bool), torch.zeros(1, 1, 1, dtype=torch.bool)]
    proposals, valid = generate_proposals(masks, torch.float64)
    expected = torch.tensor(
        [
            [0.25, 0.25, 0.05, 0.05],
            [0.75, 0.25, 0.05, 0.05],
            [0.25, 0.75, 0.05, 0.05],
            [0.75, 0.75, 0.05, 0.05],
            [0.5, 0.5, 0.1, 0.1],
        ],
        dtype=torch.float64,
    )
    assert valid.all() and proposals.dtype == torch.float64
    assert torch.allclose(proposals[0].sigmoid(), expected, atol=1e-12)


def test_proposals_relative_to_the_valid_extent_and_invalid_ring():
    masks = level_padding_masks([(16, 24)], (32, 32), [(4, 4), (2, 2)], "cpu")
    proposals, valid = generate_proposals(masks, torch.float32)
    boxes = proposals[0, :16].sigmoid().view(4, 4, 4)
    # valid width 3 cells, valid height 2 cells at level 0: centres at odd sixths / quarters
    assert torch.allclose(boxes[0, :3, 0], torch.tensor([1 / 6, 3 / 6, 5 / 6]), atol=1e-6)
    assert torch.allclose(boxes[:2, 0, 1], torch.tensor([0.25, 0.75]), atol=1e-6)
    padding = torch.cat([m.flatten(1) for m in masks], dim=1)
    assert torch.equal(valid, ~padding)
    assert torch.isinf(proposals[~valid]).all() and (proposals[~valid] > 0).all()
    # a 100-cell row: the first centre 0.005 is outside (0.01, 0.99): the outer ring is invalid
    wide = [torch.zeros(1, 1, 100, dtype=torch.bool)]
    _, valid = generate_proposals(wide, torch.float32)
    assert not valid[0, 0] and not valid[0, 99] and valid[0, 1:99].all()


def test_flatten_levels_layout():
    features = helpers.make_features(
        ((3, 4), (2, 2)), batch=2, channels=8, image_sizes=[(24, 32), (16, 16)]
    )
    assert features.tokens.shape == (2, 16, 8) and features.pos.shape == (2, 16, 8)
    assert features.level_shapes == ((3, 4), (2, 2)) and features.strides == (8, 16)
    assert features.level_sizes == [12, 4] and features.level_starts == [0, 12]
    assert features.spatial_shapes.tolist() == [[3, 4], [2, 2]]
    assert features.level_start_index.tolist() == [0, 12]
    assert features.padded_size == (24, 32)
    assert features.valid_token_counts == (16, 2 * 2 + 2 * 1)
    # image 1: 16x16 of 24x32 -> level 0 keeps ceil(16 * 3 / 24) = 2 rows x ceil(16 * 4 / 32)
    # = 2 columns, level 1 ceil(16 * 2 / 24) = 2 rows x ceil(16 * 2 / 32) = 1 column
    expected = torch.ones(3, 4, dtype=torch.bool)
    expected[:2, :2] = False
    assert torch.equal(features.padding_mask[1, :12].view(3, 4), expected)
    assert features.padding_mask[1, 12:].tolist() == [False, True, False, True]
    assert torch.allclose(features.valid_ratios[1], torch.tensor([[0.5, 2 / 3], [0.5, 1.0]]))


def test_flatten_levels_rejects_mismatched_inputs():
    maps = [torch.zeros(1, 4, 2, 2)]
    masks = [torch.zeros(1, 2, 2, dtype=torch.bool)]
    with pytest.raises(ValueError, match="one mask"):
        flatten_levels(
            maps,
            masks,
            [torch.zeros(1, 4, 2, 2)],
            torch.zeros(2, 4),
            strides=[8],
            padded_size=(16, 16),
            image_sizes=[(16, 16)],
        )
    level_embed = torch.zeros(1, 4)
    with pytest.raises(ValueError, match=r"level 0: features \(1, 4, 2, 2\) need a mask"):
        flatten_levels(
            maps,
            [torch.zeros(1, 2, 3, dtype=torch.bool)],
            [torch.zeros(1, 4, 2, 2)],
            level_embed,
            strides=[8],
            padded_size=(16, 16),
            image_sizes=[(16, 16)],
        )
    with pytest.raises(ValueError, match="2 sizes for a batch of 1"):
        flatten_levels(
            maps,
            masks,
            [torch.zeros(1, 4, 2, 2)],
            level_embed,
            strides=[8],
            padded_size=(16, 16),
            image_sizes=[(16, 16)] * 2,
        )


def test_flattened_features_check_their_geometry_once_without_reading_tensors():
    features = helpers.make_features(((3, 4), (2, 2)), batch=2, channels=8)
    assert features.valid_token_counts == (16, 16)
    fields = {
        name: getattr(features, name)
        for name in features.__dataclass_fields__
        if name not in ("spatial_shapes", "level_start_index")
    }
    with pytest.raises(ValueError, match=r"hold 14 tokens but tokens has N = 16"):
        FlattenedFeatures(**{**fields, "level_shapes": ((3, 4), (1, 2))})
    with pytest.raises(ValueError, match="positive"):
        FlattenedFeatures(**{**fields, "level_shapes": ((0, 4), (2, 2))})
    with pytest.raises(ValueError, match=r"one stride per level"):
        FlattenedFeatures(**{**fields, "strides": (8,)})
    with pytest.raises(ValueError, match=r"2 counts in \[0, 16\], got \(16, 17\)"):
        FlattenedFeatures(**{**fields, "valid_token_counts": (16, 17)})
    # the op's level tensors are made from the Python shapes, not taken from the caller
    with pytest.raises(TypeError):
        FlattenedFeatures(**fields, spatial_shapes=features.spatial_shapes)


def test_tokens_follow_the_row_major_order_of_each_level():
    maps = [torch.arange(6.0).view(1, 1, 2, 3), torch.tensor([[[[10.0]]]])]
    masks = [torch.zeros(1, 2, 3, dtype=torch.bool), torch.zeros(1, 1, 1, dtype=torch.bool)]
    positions = [torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 1, 1)]
    level_embed = torch.tensor([[100.0], [200.0]])
    flat = flatten_levels(
        maps,
        masks,
        positions,
        level_embed,
        strides=[8, 16],
        padded_size=(16, 24),
        image_sizes=[(16, 24)],
    )
    assert flat.tokens[0, :, 0].tolist() == [0, 1, 2, 3, 4, 5, 10]
    assert flat.pos[0, :, 0].tolist() == [100.0] * 6 + [200.0]

    # an encoder that uses no position embedding: pos is None, the rest is the same
    geometry = dict(strides=[8, 16], padded_size=(16, 24), image_sizes=[(16, 24)])
    bare = flatten_levels(maps, masks, None, None, **geometry)
    assert bare.pos is None and torch.equal(bare.tokens, flat.tokens)
    assert torch.equal(bare.proposals, flat.proposals)
    with pytest.raises(ValueError, match="both be given or both be None, got None positions"):
        flatten_levels(maps, masks, None, level_embed, **geometry)


def test_encoder_reference_points_by_hand():
    features = helpers.make_features(((2, 2), (1, 1)), batch=1, channels=4, image_sizes=[(8, 16)])
    # 16x16 padded: image 8x16 -> level 0 keeps 1 row x 2 columns (ratios 1, 0.5)
    points = encoder_reference_points(features)
    assert points.shape == (1, 5, 2, 2)
    # token (row 0, col 1) of level 0: centre (1.5 / 2, 0.5 / 1) in the valid frame, then x ratio
    ratios = features.valid_ratios[0]
    expected = torch.tensor([0.75, 0.5])[None] * ratios
    assert torch.allclose(points[0, 1], expected)
    assert math.isclose(float(ratios[0, 1]), 0.5)
