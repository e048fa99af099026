"""
Boxes of dataset records that are not boxes: dropped, counted, never reinterpreted.

detectron2 converts an ``XYWH_ABS`` box to ``XYXY_ABS`` and its transforms take the minimum and
maximum of the corners, so a box of negative width comes out as a valid box of positive width at
another place; a box that is empty after clipping to the image is dropped without a word. Here a
box is invalid when it has not 4 finite numbers, a width or height <= 0, or nothing left after
clipping to the image (when the record has ``width`` and ``height``). Boxes of other modes
(relative or rotated) are left to detectron2.
"""

import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.structures import BoxMode

__all__ = ["drop_invalid_boxes", "invalid_box_reason", "valid_annotations"]

logger = logging.getLogger(__name__)


def invalid_box_reason(
    bbox: Sequence[float], bbox_mode, width: Optional[float] = None, height: Optional[float] = None
) -> Optional[str]:
    """
    Why ``bbox`` (in ``bbox_mode``, of an image of ``width`` x ``height`` pixels when known) is
    not a valid box, or None when it is (or when its mode is neither XYWH_ABS nor XYXY_ABS).
    """
    try:
        mode = BoxMode(bbox_mode)
    except ValueError:
        return f"bbox_mode {bbox_mode!r} is not a BoxMode"
    if mode not in (BoxMode.XYWH_ABS, BoxMode.XYXY_ABS):
        return None
    try:
        values = [float(v) for v in bbox]
    except (TypeError, ValueError):
        return f"bbox {bbox!r} is not a list of numbers"
    if len(values) != 4:
        return f"bbox {bbox!r} has {len(values)} numbers, not 4"
    if not all(math.isfinite(v) for v in values):
        return f"bbox {bbox!r} is not finite"
    x0, y0, a, b = values
    x1, y1 = (x0 + a, y0 + b) if mode == BoxMode.XYWH_ABS else (a, b)
    if x1 <= x0 or y1 <= y0:
        return f"bbox {bbox!r} ({mode.name}) has a width or height <= 0"
    if width is not None and height is not None:
        if min(x1, width) <= max(x0, 0) or min(y1, height) <= max(y0, 0):
            return f"bbox {bbox!r} ({mode.name}) lies outside the {width}x{height} image"
    return None


def valid_annotations(record: Dict) -> Tuple[List[Dict], List[str]]:
    """The annotations of a dataset ``record`` whose box is valid, and why each other one is not
    (see :func:`invalid_box_reason`; the image size is the record's ``width`` and ``height``)."""
    kept, reasons = [], []
    for annotation in record.get("annotations") or []:
        reason = invalid_box_reason(
            annotation.get("bbox", ()),
            annotation.get("bbox_mode", BoxMode.XYWH_ABS),
            record.get("width"),
            record.get("height"),
        )
        if reason is None:
            kept.append(annotation)
        else:
            reasons.append(reason)
    return kept, reasons


def drop_invalid_boxes(records: List[Dict], dataset: str) -> Tuple[List[Dict], int]:
    """
    ``records`` without the annotations whose box is invalid (see :func:`invalid_box_reason`),
    and how many were dropped; one warning counts them for the whole ``dataset`` (a name for the
    message) and shows the first. Records without an invalid box are returned as they are.
    """
    dropped, images, left_empty, first = 0, 0, 0, None
    kept_records = []
    for record in records:
        annotations = record.get("annotations")
        if not annotations:
            kept_records.append(record)
            continue
        kept, reasons = valid_annotations(record)
        if reasons and first is None:
            first = f"{record.get('file_name', '(no file_name)')}: {reasons[0]}"
        if not reasons:
            kept_records.append(record)
            continue
        dropped += len(annotations) - len(kept)
        images += 1
        left_empty += not kept
        kept_records.append(dict(record, annotations=kept))
    if dropped:
        logger.warning(
            f"Dataset {dataset}: dropped {dropped} boxes that are not valid boxes, in {images} "
            f"images ({left_empty} of them left without a box); the first: {first}"
        )
    return kept_records, dropped
