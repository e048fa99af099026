import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from focus_detr.modeling.encoders.foreground_targets import (
    REFERENCE_SIZE_RANGES,
    ForegroundLoss,
    compute_foreground_targets,
    default_size_ranges,
    foreground_loss,
    overlapping_size_ranges,
)

# a 16 x 16 padded input: level 0 stride 4 (4 x 4 cells, centres 2, 6, 10, 14),
# level 1 stride 8 (2 x 2 cells, centres 4, 12); flattened index = level offset + i * w + j
SHAPES = [(4, 4), (2, 2)]
STRIDES = (4, 8)


def positives(targets: torch.Tensor) -> list:
    return targets.nonzero()[:, -1].tolist()


def test_one_box_small_range_positives_on_fine_level():
    # centres (2,2), (6,2), (2,6), (6,6) are inside (0,0,9,9), with max(l,t,r,b) = 7, 7, 7, 6
    targets = compute_foreground_targets(
        [torch.tensor([[0.0, 0.0, 9.0, 9.0]])], SHAPES, STRIDES, [(-1, 8), (8, math.inf)]
    )
    assert targets.shape == (1, 20)
    assert positives(targets) == [0, 1, 4, 5]


def test_one_box_large_range_positives_on_coarse_level():
    # no fine cell has max(l,t,r,b) <= 4; the coarse cell (4,4) has l,t,r,b = 4,4,5,5
    targets = compute_foreground_targets(
        [torch.tensor([[0.0, 0.0, 9.0, 9.0]])], SHAPES, STRIDES, [(-1, 4), (4, math.inf)]
    )
    assert positives(targets) == [16]


def test_strictly_inside_and_range_bounds():
    # box edges through cell centres: those cells are outside (min(l,t,r,b) = 0)
    targets = compute_foreground_targets(
        [torch.tensor([[2.0, 2.0, 9.0, 9.0]])], SHAPES, STRIDES, [(-1, 8), (8, math.inf)]
    )
    assert positives(targets) == [5]
    # (0,0,12,12): coarse cell (4,4) has max exactly 8: excluded from (8, inf], included in (7, inf]
    box = [torch.tensor([[0.0, 0.0, 12.0, 12.0]])]
    assert positives(compute_foreground_targets(box, SHAPES, STRIDES, [(-1, 8), (8, 99)])) == [5]
    assert positives(compute_foreground_targets(box, SHAPES, STRIDES, [(-1, 8), (7, 99)])) == [
        5,
        16,
    ]
    # hi is inclusive: fine cell (6,6) has max 6
    assert positives(compute_foreground_targets(box, SHAPES, STRIDES, [(-1, 6), (99, 100)])) == [5]


def test_overlapping_ranges():
    assert overlapping_size_ranges() == [(-1, 64), (32, 128), (64, 256), (128, math.inf)]
    assert overlapping_size_ranges(REFERENCE_SIZE_RANGES, 0.0) == list(REFERENCE_SIZE_RANGES)
    ranges = overlapping_size_ranges([(-1, 8), (8, math.inf)])
    assert ranges == [(-1, 8), (4, math.inf)]
    # the box of the first test is now positive on both levels
    targets = compute_foreground_targets(
        [torch.tensor([[0.0, 0.0, 9.0, 9.0]])], SHAPES, STRIDES, ranges
    )
    assert positives(targets) == [0, 1, 4, 5, 16]
    with pytest.raises(ValueError, match="1.0"):
        overlapping_size_ranges(overlap=1.0)


def test_empty_image_and_batch():
    boxes = [torch.tensor([[0.0, 0.0, 9.0, 9.0]]), torch.zeros(0, 4)]
    targets = compute_foreground_targets(boxes, SHAPES, STRIDES, [(-1, 8), (8, math.inf)])
    assert targets.shape == (2, 20)
    assert positives(targets[:1]) == [0, 1, 4, 5]
    assert targets[1].sum() == 0
    logits = torch.randn(2, 20, requires_grad=True)
    loss = foreground_loss(logits, targets, torch.zeros(2, 20, dtype=torch.bool))
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def dense_targets(boxes, shapes, strides, ranges):
    """Brute force (N, M, 4) reference for one image."""
    rows = []
    for (h, w), s, (lo, hi) in zip(shapes, strides, ranges):
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        x = (xs.flatten() * s + s // 2).float()[:, None]
        y = (ys.flatten() * s + s // 2).float()[:, None]
        ltrb = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], -1)
        extent = ltrb.max(-1).values
        rows.append(((ltrb.min(-1).values > 0) & (extent > lo) & (extent <= hi)).any(-1))
    return torch.cat(rows).float()


def test_crowded_image_chunking_matches_dense_reference():
    torch.manual_seed(0)
    shapes = [(16, 12), (8, 6), (4, 3)]
    strides = (8, 16, 32)
    ranges = overlapping_size_ranges([(-1, 16), (16, 48), (48, math.inf)])
    corner = torch.rand(500, 2) * torch.tensor([96.0, 128.0])
    size = torch.rand(500, 2) * 80 + 1
    boxes = torch.cat([corner, corner + size], dim=1)
    expected = dense_targets(boxes, shapes, strides, ranges)
    assert 0 < expected.sum() < expected.numel()
    # the largest temporary holds about max_elements values: from 1 box to all 500 at once
    for max_elements in (1, 7 * 192, 32 * 192, 500 * 192):
        targets = compute_foreground_targets(
            [boxes], shapes, strides, ranges, max_elements=max_elements
        )
        assert torch.equal(targets[0], expected)


def test_batch_equals_images_alone():
    torch.manual_seed(0)
    shapes, strides = [(8, 8), (4, 4)], (8, 16)
    ranges = [(-1, 24), (24, math.inf)]
    boxes = [
        torch.tensor([[0.0, 0.0, 30.0, 20.0], [10.0, 10.0, 60.0, 60.0]]),
        torch.zeros(0, 4),
        torch.tensor([[5.0, 5.0, 25.0, 45.0]]),
    ]
    batch = compute_foreground_targets(boxes, shapes, strides, ranges)
    for image, image_boxes in enumerate(boxes):
        alone = compute_foreground_targets([image_boxes], shapes, strides, ranges)
        assert torch.equal(batch[image], alone[0])
    assert batch[1].sum() == 0 and batch[0].sum() > 0 and batch[2].sum() > 0


def test_crowded_image_full_resolution_is_bounded():
    """
    800 x 1333 input, M = 500: a dense (N, M, 4) float tensor would be 178 MB; the chunked
    computation gives the same targets whatever the bound of its temporaries.
    """
    torch.manual_seed(0)
    shapes = [(100, 167), (50, 84), (25, 42), (13, 21)]
    corner = torch.rand(500, 2) * torch.tensor([1200.0, 700.0])
    boxes = torch.cat([corner, corner + torch.rand(500, 2) * 300 + 2], dim=1)
    targets = compute_foreground_targets([boxes], shapes, (8, 16, 32, 64))
    small = compute_foreground_targets([boxes], shapes, (8, 16, 32, 64), max_elements=1 << 18)
    assert targets.shape == (1, 22223) and targets.sum() > 0
    assert torch.equal(targets, small)


def test_default_size_ranges():
    assert default_size_ranges(4) == list(REFERENCE_SIZE_RANGES)
    assert default_size_ranges(3) == [(-1.0, 64.0), (64.0, 128.0), (128.0, math.inf)]
    assert default_size_ranges(5)[-2:] == [(256.0, 512.0), (512.0, math.inf)]
    with pytest.raises(ValueError, match="0"):
        default_size_ranges(0)


@pytest.mark.parametrize(
    "strides, ranges, message",
    [
        ((4, 8), [(-1, 8)], "one size range per level"),
        ((4, 8), [(-1, 8), (8, 8)], r"\(8, 8\)"),
        ((4, 8), [(-1, 8), (9, 3)], r"\(9, 3\)"),
        ((4,), [(-1, 8), (8, 16)], r"\[4\]"),
        ((4, 0), [(-1, 8), (8, 16)], r"\[4, 0\]"),
    ],
)
def test_invalid_arguments(strides, ranges, message):
    with pytest.raises(ValueError, match=message):
        compute_foreground_targets([torch.zeros(0, 4)], SHAPES, strides, ranges)


def test_focal_loss_normalised_by_positive_count_per_image():
    torch.manual_seed(0)
    logits = torch.randn(2, 6)
    targets = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.float32)
    padding = torch.tensor([[False] * 6, [False] * 3 + [True] * 3])
    loss = foreground_loss(logits, targets, padding)
    # image 0: 3 positives; image 1: its only positive is padding, so 0 positives -> divide by 1
    per_token = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="none")
    expected = (per_token[0].sum() / 3 + per_token[1, :3].sum() / 1) / 2
    torch.testing.assert_close(loss, expected)
    # padded logits never matter, even non-finite ones
    changed = logits.clone()
    changed[1, 3:] = float("inf")
    torch.testing.assert_close(foreground_loss(changed, targets, padding), expected)


def test_focal_loss_with_padding_as_negatives():
    """The reference: padded tokens count as negatives with their own logits."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6)
    targets = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.float32)
    padding = torch.tensor([[False] * 6, [False] * 3 + [True] * 3])
    loss = foreground_loss(logits, targets, padding, include_padding=True)
    # by hand: alpha-weighted (1 - p_t)^2 * BCE over all 6 tokens of each image
    p = logits.sigmoid()
    p_t = torch.where(targets > 0, p, 1 - p)
    alpha_t = torch.where(targets > 0, 0.25, 0.75)
    per_token = -alpha_t * (1 - p_t) ** 2 * torch.log(p_t)
    expected = (per_token[0].sum() / 3 + per_token[1].sum() / 1) / 2
    torch.testing.assert_close(loss, expected)
    # the padded logits matter now: a confident padded token costs more
    changed = logits.clone()
    changed[1, 3:] = 5.0
    assert foreground_loss(changed, targets, padding, include_padding=True) > loss + 1.0
    torch.testing.assert_close(
        foreground_loss(changed, targets, padding), foreground_loss(logits, targets, padding)
    )
    module = ForegroundLoss(num_levels=2, include_padding=True, weight=2.0)
    targets_2d = compute_foreground_targets(
        [torch.tensor([[0.0, 0.0, 9.0, 9.0]]), torch.zeros(0, 4)], SHAPES, STRIDES, module.ranges
    )
    logits_2d = torch.randn(2, 20)
    padding_2d = torch.zeros(2, 20, dtype=torch.bool)
    padding_2d[1, 2:] = True
    boxes = [torch.tensor([[0.0, 0.0, 9.0, 9.0]]), torch.zeros(0, 4)]
    torch.testing.assert_close(
        module(logits_2d, padding_2d, SHAPES, STRIDES, boxes),
        2.0 * foreground_loss(logits_2d, targets_2d, padding_2d, include_padding=True),
    )


def test_foreground_loss_module_applies_weight():
    torch.manual_seed(0)
    boxes = [torch.tensor([[0.0, 0.0, 9.0, 9.0]]), torch.zeros(0, 4)]
    logits = torch.randn(2, 20)
    padding = torch.zeros(2, 20, dtype=torch.bool)
    module = ForegroundLoss(num_levels=2, ranges=[(-1, 8), (8, math.inf)])
    targets = compute_foreground_targets(boxes, SHAPES, STRIDES, [(-1, 8), (8, math.inf)])
    expected = 1.5 * foreground_loss(logits, targets, padding)
    torch.testing.assert_close(module(logits, padding, SHAPES, STRIDES, boxes), expected)
    with pytest.raises(ValueError, match="-1"):
        ForegroundLoss(num_levels=2, ranges=[(-1, 8), (8, math.inf)], weight=-1)
    with pytest.raises(ValueError, match="one size range per level"):
        ForegroundLoss(num_levels=3, ranges=[(-1, 8), (8, math.inf)])
