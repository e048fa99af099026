import pytest
import torch

from focus_detr.modeling.denoising import ContrastiveDenoising, build_denoising_attn_mask


def _targets(*counts, num_classes=5):
    targets = []
    for count in counts:
        centres = torch.rand(count, 2) * 0.4 + 0.3
        sizes = torch.rand(count, 2) * 0.2 + 0.1
        targets.append(
            {
                "labels": torch.randint(0, num_classes, (count,)),
                "boxes": torch.cat([centres, sizes], dim=1),
            }
        )
    return targets


def _denoiser(**kwargs):
    kwargs.setdefault("num_classes", 5)
    kwargs.setdefault("hidden_dim", 8)
    return ContrastiveDenoising(**kwargs)


def test_attn_mask_two_gts_two_groups_three_queries():
    # 2 GTs -> single_pad 4 (2 positives, 2 negatives), 2 groups -> pad_size 8, plus Q = 3.
    o, x = False, True
    expected = torch.tensor(
        [
            # group 0 (rows 0-3) sees itself and the matching queries
            [o, o, o, o, x, x, x, x, o, o, o],
            [o, o, o, o, x, x, x, x, o, o, o],
            [o, o, o, o, x, x, x, x, o, o, o],
            [o, o, o, o, x, x, x, x, o, o, o],
            # group 1 (rows 4-7)
            [x, x, x, x, o, o, o, o, o, o, o],
            [x, x, x, x, o, o, o, o, o, o, o],
            [x, x, x, x, o, o, o, o, o, o, o],
            [x, x, x, x, o, o, o, o, o, o, o],
            # matching queries see no DN query
            [x, x, x, x, x, x, x, x, o, o, o],
            [x, x, x, x, x, x, x, x, o, o, o],
            [x, x, x, x, x, x, x, x, o, o, o],
        ]
    )
    assert torch.equal(build_denoising_attn_mask(2, 4, 3), expected)
    dn = _denoiser(dn_number=4)(_targets(2), num_queries=3)
    assert (dn.num_groups, dn.single_pad, dn.pad_size, dn.max_gt) == (2, 4, 8, 2)
    assert torch.equal(dn.attn_mask, expected)


@pytest.mark.parametrize(
    "dn_number,counts,groups",
    [(100, (3,), 33), (100, (1, 4), 25), (100, (150,), 1), (10, (0, 3), 3), (1, (2,), 1)],
)
def test_group_count_uses_largest_image(dn_number, counts, groups):
    dn = _denoiser(dn_number=dn_number)(_targets(*counts), num_queries=7)
    max_gt = max(counts)
    assert dn.num_groups == groups == max(1, dn_number // max_gt)
    assert dn.single_pad == 2 * max_gt
    assert dn.queries.shape == (len(counts), groups * 2 * max_gt, 8)
    assert dn.reference_boxes.shape == (len(counts), groups * 2 * max_gt, 4)
    assert dn.attn_mask.shape == (dn.pad_size + 7, dn.pad_size + 7)
    assert dn.key_padding_mask.shape == (len(counts), dn.pad_size + 7)


def test_none_without_boxes_or_budget():
    assert _denoiser()(_targets(0, 0), num_queries=4) is None
    assert _denoiser(dn_number=0)(_targets(3), num_queries=4) is None


def test_layout_padding_and_positive_indices_without_noise():
    torch.manual_seed(0)
    module = _denoiser(dn_number=4, label_noise_ratio=0.0, box_noise_scale=0.0)
    targets = _targets(2, 1)
    dn = module(targets, num_queries=3)
    assert dn.num_groups == 2 and dn.single_pad == 4
    # image 0: positives at 0,1 (group 0) and 4,5 (group 1); negatives at 2,3 and 6,7
    pred_idx, tgt_idx = dn.positive_indices[0]
    assert pred_idx.tolist() == [0, 1, 4, 5] and tgt_idx.tolist() == [0, 1, 0, 1]
    pred_idx, tgt_idx = dn.positive_indices[1]
    assert pred_idx.tolist() == [0, 4] and tgt_idx.tolist() == [0, 0]
    assert dn.slot_padding_mask[0].tolist() == [False] * 8
    # image 1 has one GT: the second slot of each half of each group is padding
    assert dn.slot_padding_mask[1].tolist() == [False, True, False, True] * 2
    assert dn.key_padding_mask[1].tolist() == [False, True, False, True] * 2 + [False] * 3
    embed = module.label_embedding.weight
    for image, target in enumerate(targets):
        for gt in range(len(target["labels"])):
            for slot in (gt, gt + 2, gt + 4, gt + 6):
                assert torch.equal(dn.queries[image, slot], embed[target["labels"][gt]])
                assert torch.allclose(dn.reference_boxes[image, slot], target["boxes"][gt])
    assert torch.all(dn.queries[1, dn.slot_padding_mask[1]] == 0)


def test_label_noise_rate():
    torch.manual_seed(0)
    module = _denoiser(num_classes=10, label_noise_ratio=1.0)
    labels = torch.randint(0, 10, (20000,))
    changed = (module.noise_labels(labels) != labels).float().mean().item()
    # flipped with p = 0.5, and a flip lands on the same class with p = 1/10
    assert abs(changed - 0.45) < 0.02
    assert torch.equal(_denoiser(label_noise_ratio=0.0).noise_labels(labels), labels)


def test_box_noise_ranges():
    torch.manual_seed(0)
    scale = 0.5  # corners of (0.5, 0.5, 0.2, 0.2) move < 0.1: no clamping, no crossing
    module = _denoiser(box_noise_scale=scale)
    count = 2000
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(count, 1)
    negative = torch.arange(count) >= count // 2
    noised = module.noise_boxes(boxes, negative)
    corners = torch.cat([noised[:, :2] - noised[:, 2:] / 2, noised[:, :2] + noised[:, 2:] / 2], 1)
    original = torch.tensor([0.4, 0.4, 0.6, 0.6])
    ratio = (corners - original).abs() / (scale * 0.1)  # |shift| / (scale * w / 2) = r
    eps = 1e-4
    assert ratio[~negative].max() < 1 + eps
    assert ratio[negative].min() > 1 - eps and ratio[negative].max() < 2 + eps
    # both directions and the whole range are used
    assert ratio[~negative].min() < 0.05 and ratio[negative].max() > 1.95
    shift = corners - original
    assert (shift > 0).any() and (shift < 0).any()


def test_box_noise_clamped_near_border():
    torch.manual_seed(0)
    module = _denoiser(box_noise_scale=1.0)
    boxes = torch.tensor([[0.05, 0.95, 0.1, 0.1], [0.5, 0.5, 1.0, 1.0]]).repeat(500, 1)
    noised = module.noise_boxes(boxes, torch.arange(1000) % 3 == 0)
    corners = torch.cat([noised[:, :2] - noised[:, 2:] / 2, noised[:, :2] + noised[:, 2:] / 2], 1)
    assert torch.isfinite(noised).all()
    assert corners.min() >= -1e-6 and corners.max() <= 1 + 1e-6
    assert (noised[:, 2:] >= 0).all()


def test_deterministic_under_manual_seed():
    module = _denoiser(dn_number=10)
    targets = _targets(3, 2)
    torch.manual_seed(7)
    first = module(targets, num_queries=5)
    torch.manual_seed(7)
    second = module(targets, num_queries=5)
    assert torch.equal(first.queries, second.queries)
    assert torch.equal(first.reference_boxes, second.reference_boxes)


def test_split_and_gradient_to_label_embedding():
    module = _denoiser(dn_number=6)
    dn = module(_targets(2, 3), num_queries=4)
    logits = torch.randn(3, 2, dn.pad_size + 4, 5)
    dn_part, matching = dn.split(logits)
    assert dn_part.shape == (3, 2, dn.pad_size, 5) and matching.shape == (3, 2, 4, 5)
    assert torch.equal(torch.cat([dn_part, matching], dim=2), logits)
    boxes = torch.rand(3, 2, dn.pad_size + 4, 4)
    (match_logits, match_boxes), dn_outputs = dn.split_outputs(logits, boxes)
    assert torch.equal(match_logits, matching) and match_boxes.shape == (3, 2, 4, 4)
    assert len(dn_outputs) == 3
    assert torch.equal(dn_outputs[1]["pred_logits"], logits[1, :, : dn.pad_size])
    assert torch.equal(dn_outputs[2]["pred_boxes"], boxes[2, :, : dn.pad_size])
    dn.queries.sum().backward()
    assert module.label_embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dn_number": -1},
        {"label_noise_ratio": 1.5},
        {"label_noise_ratio": -0.1},
        {"box_noise_scale": -1.0},
        {"num_classes": 0},
    ],
)
def test_constructor_validation(kwargs):
    with pytest.raises(ValueError):
        _denoiser(**kwargs)


def test_num_queries_validation():
    with pytest.raises(ValueError, match="num_queries"):
        _denoiser()(_targets(1), num_queries=0)
