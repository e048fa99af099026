"""Ground truth to targets and predictions to Instances, against hand-worked values."""

import math

import pytest
import torch
from helpers import make_instances

from focus_detr.modeling.detection_targets import instances_to_targets, predictions_to_instances


def test_targets_by_hand():
    instances = make_instances((100, 200), [[20, 10, 60, 50], [150, 80, 250, 120]], [2, 0])
    (target,) = instances_to_targets([instances], [(100, 200)], num_classes=3)
    assert target["labels"].tolist() == [2, 0]
    # the second box is clipped to the image: (150, 80, 200, 100)
    assert target["boxes_xyxy"].tolist() == [[20, 10, 60, 50], [150, 80, 200, 100]]
    # cxcywh normalized by (w, h) = (200, 100)
    expected = torch.tensor([[40 / 200, 30 / 100, 40 / 200, 40 / 100], [175 / 200, 0.9, 0.25, 0.2]])
    torch.testing.assert_close(target["boxes"], expected)


def test_degenerate_and_non_finite_boxes_are_dropped():
    boxes = [
        [10, 10, 10, 40],  # zero width
        [30, 20, 5, 40],  # inverted
        [300, 10, 320, 50],  # wholly outside
        [math.nan, 1, 5, 5],
        [1, 1, math.inf, 5],
        [2, 3, 12, 13],  # the only usable box
    ]
    instances = make_instances((50, 60), boxes, [0, 1, 2, 0, 1, 2])
    (target,) = instances_to_targets([instances], [(50, 60)], num_classes=3)
    assert target["labels"].tolist() == [2]
    assert target["boxes_xyxy"].tolist() == [[2, 3, 12, 13]]
    assert torch.isfinite(target["boxes"]).all()


def test_empty_image():
    (target,) = instances_to_targets([make_instances((30, 40), [])], [(30, 40)], num_classes=3)
    assert target["labels"].shape == (0,) and target["boxes"].shape == (0, 4)


@pytest.mark.parametrize("bad_class", [3, 7, -1])
def test_class_id_outside_the_model_classes_names_it(bad_class):
    instances = make_instances((30, 40), [[1, 1, 10, 10], [2, 2, 20, 20]], [0, bad_class])
    with pytest.raises(ValueError, match=rf"\[{bad_class}\] outside \[0, 3\).*num_classes"):
        instances_to_targets([make_instances((30, 40), []), instances], [(30, 40)] * 2, 3)


def test_predictions_by_hand():
    # 2 queries x 3 classes: the best (query, class) pairs first, boxes scaled to (h, w)
    logits = torch.tensor([[[0.0, 3.0, -1.0], [2.0, -5.0, 1.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])
    (result,) = predictions_to_instances(logits, boxes, [(100, 200)], num_select=3)
    assert result.image_size == (100, 200)
    assert result.pred_classes.tolist() == [1, 0, 2]
    torch.testing.assert_close(result.scores, torch.tensor([3.0, 2.0, 1.0]).sigmoid())
    expected = torch.tensor(
        [[80.0, 30.0, 120.0, 70.0], [0.0, 50.0, 100.0, 100.0], [0.0, 50.0, 100.0, 100.0]]
    )
    torch.testing.assert_close(result.pred_boxes.tensor, expected)
    # clipped to the image, and never more than Q * K detections
    outside = torch.tensor([[[0.9, 0.9, 0.4, 0.4], [0.5, 0.5, 0.1, 0.1]]])
    (result,) = predictions_to_instances(logits, outside, [(10, 10)], num_select=100)
    assert len(result) == 6
    assert result.pred_boxes.tensor.max() <= 10
