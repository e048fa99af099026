"""Focus-DETR for detectron2: efficient DETR encoders with foreground token selection."""

__version__ = "0.1.0"
