from .criterion import SetCriterion
from .decoder import DINODecoder, DINODecoderLayer
from .denoising import ContrastiveDenoising
from .encoder_layer import FocusEncoderLayer
from .encoder_output import EncoderOutput
from .focus_detr import FocusDETR
from .focus_encoder import FocusEncoder
from .foreground_selector import ForegroundTokenSelector
from .foreground_targets import (
    REFERENCE_SIZE_RANGES,
    compute_foreground_targets,
    foreground_loss,
    overlapping_size_ranges,
)
from .matcher import HungarianMatcher
from .neck import MultiScaleNeck
from .position_encoding import PositionEmbeddingSine, get_sine_pos_embed
from .query_selection import TwoStageQuerySelection

__all__ = [
    "REFERENCE_SIZE_RANGES",
    "ContrastiveDenoising",
    "DINODecoder",
    "DINODecoderLayer",
    "EncoderOutput",
    "FocusDETR",
    "FocusEncoder",
    "FocusEncoderLayer",
    "ForegroundTokenSelector",
    "HungarianMatcher",
    "MultiScaleNeck",
    "PositionEmbeddingSine",
    "SetCriterion",
    "TwoStageQuerySelection",
    "compute_foreground_targets",
    "foreground_loss",
    "get_sine_pos_embed",
    "overlapping_size_ranges",
]
