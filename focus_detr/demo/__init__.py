"""Demo of focus_detr: draw detections and what the encoder selects.

``python -m focus_detr.demo --config-file CFG --weights PTH --input IMAGES_OR_FOLDERS`` (or
``--val-images N``) writes, per image, ``<name>_predictions.png`` and ``<name>_tokens.png``: the
foreground probability of every feature level and the tokens every encoder layer kept.
"""

from .drawing import draw_predictions, draw_token_selection
from .inputs import DemoInputError, dataset_images, dataset_metadata, find_images
from .predictor import FocusDETRPredictor, Prediction, TokenSelection, load_config
from .runner import run_demo
from .token_maps import LevelGrid, foreground_maps, kept_token_maps, level_grids, split_levels

__all__ = [
    "DemoInputError",
    "FocusDETRPredictor",
    "LevelGrid",
    "Prediction",
    "TokenSelection",
    "dataset_images",
    "dataset_metadata",
    "draw_predictions",
    "draw_token_selection",
    "find_images",
    "foreground_maps",
    "kept_token_maps",
    "level_grids",
    "load_config",
    "run_demo",
    "split_levels",
]
