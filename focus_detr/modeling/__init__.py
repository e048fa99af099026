from .criterion import SetCriterion
from .decoder import DINODecoder, DINODecoderLayer
from .denoising import ContrastiveDenoising
from .encoders import (
    REFERENCE_SIZE_RANGES,
    DenseEncoder,
    DETREncoder,
    FocusEncoder,
    ForegroundTokenSelector,
    HybridEncoder,
    LiteEncoder,
    SparseEncoder,
    compute_foreground_targets,
    default_size_ranges,
    foreground_loss,
    overlapping_size_ranges,
)
from .matcher import HungarianMatcher
from .meta_arch import FocusDETR, InferenceDetails, TwoStageDETR
from .neck import MultiScaleNeck, neck_from_backbone
from .position_encoding import PositionEmbeddingSine, get_sine_pos_embed
from .query_selection import TwoStageQuerySelection
from .structures import DecoderOutput, EncoderOutput, FlattenedFeatures

__all__ = [
    "REFERENCE_SIZE_RANGES",
    "ContrastiveDenoising",
    "DETREncoder",
    "DINODecoder",
    "DINODecoderLayer",
    "DecoderOutput",
    "DenseEncoder",
    "EncoderOutput",
    "FlattenedFeatures",
    "FocusDETR",
    "FocusEncoder",
    "ForegroundTokenSelector",
    "HungarianMatcher",
    "HybridEncoder",
    "InferenceDetails",
    "LiteEncoder",
    "MultiScaleNeck",
    "neck_from_backbone",
    "PositionEmbeddingSine",
    "SetCriterion",
    "SparseEncoder",
    "TwoStageDETR",
    "TwoStageQuerySelection",
    "compute_foreground_targets",
    "default_size_ranges",
    "foreground_loss",
    "get_sine_pos_embed",
    "overlapping_size_ranges",
]
