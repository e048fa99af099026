"""Compare exported detections with PyTorch's ``model.inference`` detections."""

from dataclasses import dataclass

import numpy as np

__all__ = ["DetectionComparison", "compare_detections"]


@dataclass
class DetectionComparison:
    """
    Attributes:
        compared: reference detections compared (the best ``top``).
        unmatched: how many of them have no exported detection of the same class within
            ``score_tolerance``.
        max_box_difference: largest absolute coordinate difference (pixels) of matched pairs.
        max_score_difference: largest absolute score difference of matched pairs.
    """

    compared: int
    unmatched: int
    max_box_difference: float
    max_score_difference: float

    def within(self, box_tolerance: float, score_tolerance: float) -> bool:
        """True when every compared detection matched within the tolerances."""
        return (
            self.unmatched == 0
            and self.max_box_difference <= box_tolerance
            and self.max_score_difference <= score_tolerance
        )

    def __str__(self) -> str:
        return (
            f"top {self.compared}: max box difference {self.max_box_difference:.3g} px, max "
            f"score difference {self.max_score_difference:.3g}, {self.unmatched} unmatched"
        )


def compare_detections(
    reference_boxes: np.ndarray,
    reference_scores: np.ndarray,
    reference_classes: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    *,
    top: int = 50,
    score_tolerance: float = 1e-4,
) -> DetectionComparison:
    """
    Matches each of the ``top`` best reference detections, best first, to the exported
    detection of the same class, among those not matched yet whose score is within
    ``score_tolerance``, with the closest box. Detections whose scores differ by less than the
    numerical noise may come in either order, so positions are not compared. Exported boxes
    without area (``x2 <= x1`` or ``y2 <= y1``) are dropped first, as ``detector_postprocess``
    drops them from the reference.

    Args:
        reference_boxes, reference_scores, reference_classes: (R, 4) XYXY, (R,), (R,) of
            ``model.inference`` in decreasing score order.
        boxes, scores, classes: (S, 4), (S,), (S,) of the exported program.
        top: how many reference detections to compare.
        score_tolerance: largest score difference of a pair.

    Returns:
        :class:`DetectionComparison`.
    """
    reference_boxes = np.asarray(reference_boxes, dtype=np.float64).reshape(-1, 4)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes = boxes[keep]
    scores = np.asarray(scores, dtype=np.float64)[keep]
    classes = np.asarray(classes)[keep]
    reference_scores = np.asarray(reference_scores, dtype=np.float64)
    reference_classes = np.asarray(reference_classes)
    compared = min(top, len(reference_scores))
    used = np.zeros(len(scores), dtype=bool)
    unmatched, box_differences, score_differences = 0, [0.0], [0.0]
    for index in range(compared):
        score_gap = np.abs(scores - reference_scores[index])
        candidates = np.flatnonzero(
            ~used & (classes == reference_classes[index]) & (score_gap <= score_tolerance)
        )
        if candidates.size == 0:
            unmatched += 1
            continue
        gaps = np.abs(boxes[candidates] - reference_boxes[index]).max(axis=1)
        best = candidates[int(np.argmin(gaps))]
        used[best] = True
        box_differences.append(float(gaps.min()))
        score_differences.append(float(score_gap[best]))
    return DetectionComparison(
        compared=compared,
        unmatched=unmatched,
        max_box_difference=max(box_differences),
        max_score_difference=max(score_differences),
    )
