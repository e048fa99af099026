"""Encoders behind one interface (:class:`DETREncoder`), compared on the same decoder."""

from .base import DETREncoder, EncoderLossInputs
from .deformable_layer import DeformableEncoderLayer
from .dense import DenseEncoder
from .focus import FocusEncoder
from .focus_layer import FocusEncoderLayer
from .foreground_selector import ForegroundTokenSelector
from .foreground_targets import (
    REFERENCE_SIZE_RANGES,
    ForegroundLoss,
    compute_foreground_targets,
    default_size_ranges,
    foreground_loss,
    overlapping_size_ranges,
)
from .hybrid import HybridEncoder
from .lite import LiteAllLevelLayer, LiteEncoder
from .sparse import SparseEncoder

__all__ = [
    "REFERENCE_SIZE_RANGES",
    "DETREncoder",
    "DeformableEncoderLayer",
    "DenseEncoder",
    "EncoderLossInputs",
    "FocusEncoder",
    "FocusEncoderLayer",
    "ForegroundLoss",
    "ForegroundTokenSelector",
    "HybridEncoder",
    "LiteAllLevelLayer",
    "LiteEncoder",
    "SparseEncoder",
    "compute_foreground_targets",
    "default_size_ranges",
    "foreground_loss",
    "overlapping_size_ranges",
]
