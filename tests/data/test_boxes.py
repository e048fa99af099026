"""
A box that is not a valid box is dropped with one warning per dataset that counts them, never
reinterpreted (detectron2's transforms turn a box of negative width into a valid box elsewhere).
"""

import logging
import math

import numpy as np
import pytest
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from helpers import tiny_train_config
from PIL import Image

from focus_detr.data import DatasetMapper, drop_invalid_boxes, invalid_box_reason
from focus_detr.engine import run_preflight

XYWH, XYXY = BoxMode.XYWH_ABS, BoxMode.XYXY_ABS


@pytest.mark.parametrize(
    "bbox, mode, reason",
    [
        ([10, 10, 5, 5], XYWH, None),
        ([10, 10, 15, 15], XYXY, None),
        ([-5, -5, 10, 10], XYWH, None),  # partly outside: clipped by the mapper, kept
        ([10, 10, -5, 5], XYWH, "width or height <= 0"),
        ([10, 10, 5, 0], XYWH, "width or height <= 0"),
        ([15, 10, 10, 20], XYXY, "width or height <= 0"),
        ([10, 10, math.nan, 5], XYWH, "not finite"),
        ([10, 10, math.inf, 5], XYWH, "not finite"),
        ([10, 10, 5], XYWH, "3 numbers, not 4"),
        ([40, 10, 5, 5], XYWH, "outside the 40x30 image"),
        ([-10, 0, 10, 5], XYWH, "outside the 40x30 image"),
        ([10, 10, 5, 5], BoxMode.XYWHA_ABS, None),  # rotated boxes: detectron2's business
    ],
)
def test_invalid_box_reason(bbox, mode, reason):
    got = invalid_box_reason(bbox, mode, 40, 30)
    assert (got is None) if reason is None else (reason in got), got


def _record(name, boxes):
    annotations = [{"bbox": box, "bbox_mode": XYWH, "category_id": 0} for box in boxes]
    return {"file_name": name, "width": 40, "height": 30, "annotations": annotations}


def test_one_warning_per_dataset_counts_the_dropped_boxes(log):
    records = [
        _record("a.png", [[1, 1, 5, 5], [10, 10, -5, 5]]),
        _record("b.png", [[1, 1, math.nan, 5], [1, 1, 5, -1]]),
        _record("c.png", [[2, 2, 3, 3]]),
    ]
    kept, dropped = drop_invalid_boxes(records, "toy")
    assert dropped == 3
    assert [len(r["annotations"]) for r in kept] == [1, 0, 1]
    assert kept[2] is records[2] and len(records[0]["annotations"]) == 2  # input unchanged
    warnings = [r.getMessage() for r in log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(
        "Dataset toy: dropped 3 boxes that are not valid boxes, in 2 images (1 of them left "
        "without a box); the first: a.png: bbox [10, 10, -5, 5]"
    )


def test_the_mapper_drops_a_negative_width_box_instead_of_reordering_it(tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(path)
    record = _record(str(path), [[20, 5, -10, 10], [2, 3, 4, 5]])
    # a transform maps the corners of a box: detectron2 takes their minimum and maximum
    double = T.ResizeTransform(30, 40, 60, 80)
    mapper = DatasetMapper(is_train=True, augmentations=[double], image_format="RGB")
    boxes = mapper(record)["instances"].gt_boxes.tensor.tolist()
    assert boxes == [[4.0, 6.0, 12.0, 16.0]]  # detectron2's mapper adds [20, 10, 40, 30]


def test_the_preflight_drops_them_from_the_training_set_and_counts_the_test_set(
    shapes, tmp_path, monkeypatch, log
):
    from detectron2.data import DatasetCatalog

    load = DatasetCatalog.get

    def with_bad_boxes(name):
        records = [dict(r) for r in load(name)]
        bad = {"bbox": [5, 5, -4, 4], "bbox_mode": XYWH, "category_id": 0, "iscrowd": 0}
        records[0]["annotations"] = list(records[0]["annotations"]) + [bad, dict(bad)]
        return records

    monkeypatch.setattr(DatasetCatalog, "get", with_bad_boxes)
    train = run_preflight(tiny_train_config(tmp_path, shapes.names))
    assert len(train[0]["annotations"]) == len(load(shapes.names["train"])[0]["annotations"])
    messages = [r.getMessage() for r in log.records if "not valid boxes" in r.getMessage()]
    assert len(messages) == 2  # one per dataset
    assert f"Dataset {shapes.names['train']} (train): dropped 2 boxes" in messages[0]
    assert f"Dataset {shapes.names['val']} (test): dropped 2 boxes" in messages[1]
    assert any("no detection can match them" in r.getMessage() for r in log.records)
