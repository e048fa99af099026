import math

import pytest
import torch

from focus_detr.modeling.matcher import HungarianMatcher


def _target(labels, boxes):
    return {"labels": torch.tensor(labels, dtype=torch.int64), "boxes": torch.tensor(boxes)}


def test_obvious_two_by_two_assignment():
    gt_boxes = [[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.3, 0.3]]
    target = _target([0, 1], gt_boxes)
    # prediction 0 sits on GT 1 and says class 1; prediction 1 sits on GT 0 and says class 0
    pred_boxes = torch.tensor([[gt_boxes[1], gt_boxes[0]]])
    pred_logits = torch.tensor([[[-5.0, 5.0], [5.0, -5.0]]])
    ((pred_idx, tgt_idx),) = HungarianMatcher()(pred_logits, pred_boxes, [target])
    assert pred_idx.dtype == torch.int64 and tgt_idx.dtype == torch.int64
    assert dict(zip(pred_idx.tolist(), tgt_idx.tolist())) == {0: 1, 1: 0}


def test_cost_worked_out_by_hand():
    # one GT of class 0 at (0.5, 0.5, 0.2, 0.2); K = 2
    target = _target([0], [[0.5, 0.5, 0.2, 0.2]])
    # prediction 0: exact box, p(class 0) = 0.5; prediction 1: shifted by 0.1, p = 0.75
    pred_logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    pred_boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.6, 0.5, 0.2, 0.2]]])
    # focal cost = 0.25 (1-p)^2 (-ln p) - 0.75 p^2 (-ln(1-p))
    class_p50 = 0.25 * 0.25 * math.log(2) - 0.75 * 0.25 * math.log(2)  # -0.0866434
    class_p75 = 0.25 * 0.0625 * math.log(4 / 3) - 0.75 * 0.5625 * math.log(4)  # -0.5803479
    # prediction 1 vs GT: L1 = 0.1; xyxy (0.5,0.4,0.7,0.6) vs (0.4,0.4,0.6,0.6): inter 0.02,
    # union 0.06, hull 0.06 -> GIoU = 1/3
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    cost = matcher.cost_matrix(pred_logits[0], pred_boxes[0], target)
    expected = torch.tensor([[2 * class_p50 - 2.0], [2 * class_p75 + 5 * 0.1 - 2 / 3]])
    assert torch.allclose(cost, expected, atol=1e-5)  # [[-2.1733], [-1.3274]]
    ((pred_idx, tgt_idx),) = matcher(pred_logits, pred_boxes, [target])
    assert pred_idx.tolist() == [0] and tgt_idx.tolist() == [0]

    # with the class cost dominant the confident prediction wins: -0.866 vs -5.703
    matcher = HungarianMatcher(cost_class=10.0, cost_bbox=1.0, cost_giou=0.0)
    cost = matcher.cost_matrix(pred_logits[0], pred_boxes[0], target)
    expected = torch.tensor([[10 * class_p50], [10 * class_p75 + 0.1]])
    assert torch.allclose(cost, expected, atol=1e-5)
    ((pred_idx, _),) = matcher(pred_logits, pred_boxes, [target])
    assert pred_idx.tolist() == [1]


def test_global_optimum_not_greedy():
    # L1 only. preds at (0.5, 0.5) and (0.5, 0.8), GT a at (0.5, 0.55), GT b at (0.6, 0.5):
    # costs [[0.05, 0.10], [0.25, 0.40]]. Greedy (pred 0 -> a, pred 1 -> b) costs 0.45,
    # the optimum (pred 0 -> b, pred 1 -> a) costs 0.35.
    matcher = HungarianMatcher(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)
    target = _target([0, 0], [[0.5, 0.55, 0.2, 0.2], [0.6, 0.5, 0.2, 0.2]])
    pred_boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.8, 0.2, 0.2]]])
    cost = matcher.cost_matrix(torch.zeros(2, 1), pred_boxes[0], target)
    assert torch.allclose(cost, torch.tensor([[0.05, 0.10], [0.25, 0.40]]), atol=1e-6)
    ((pred_idx, tgt_idx),) = matcher(torch.zeros(1, 2, 1), pred_boxes, [target])
    assert dict(zip(pred_idx.tolist(), tgt_idx.tolist())) == {0: 1, 1: 0}


def test_empty_targets_and_mixed_batch():
    matcher = HungarianMatcher()
    logits, boxes = torch.randn(2, 5, 3), torch.rand(2, 5, 4)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    indices = matcher(logits, boxes, [empty, _target([2, 1], [[0.5, 0.5, 0.1, 0.1]] * 2)])
    assert indices[0][0].numel() == 0 and indices[0][1].numel() == 0
    assert indices[0][0].dtype == torch.int64
    assert len(indices[1][0]) == 2 and sorted(indices[1][1].tolist()) == [0, 1]


def test_more_targets_than_predictions():
    matcher = HungarianMatcher()
    indices = matcher(torch.randn(1, 1, 2), torch.rand(1, 1, 4), [_target([0, 1], [[0.5] * 4] * 2)])
    assert len(indices[0][0]) == 1


def test_degenerate_boxes_are_finite():
    matcher = HungarianMatcher()
    target = _target([0, 1], [[0.5, 0.5, 0.0, 0.2], [0.3, 0.3, 0.0, 0.0]])
    pred_boxes = torch.tensor([[[0.5, 0.5, 0.0, 0.2], [0.3, 0.3, 0.0, 0.0], [0.1, 0.1, 0.0, 0.0]]])
    cost = matcher.cost_matrix(torch.zeros(3, 2), pred_boxes[0], target)
    assert torch.isfinite(cost).all()
    ((pred_idx, tgt_idx),) = matcher(torch.zeros(1, 3, 2), pred_boxes, [target])
    assert dict(zip(pred_idx.tolist(), tgt_idx.tolist())) == {0: 0, 1: 1}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cost_class": 0.0, "cost_bbox": 0.0, "cost_giou": 0.0},
        {"cost_bbox": -1.0},
        {"focal_alpha": 1.5},
    ],
)
def test_constructor_validation(kwargs):
    with pytest.raises(ValueError):
        HungarianMatcher(**kwargs)
