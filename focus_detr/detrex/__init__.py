"""Checkpoints of detrex's Focus-DETR (``projects/focus_detr``) in this package's names."""

from .convert import convert_detrex_state_dict, load_state_dict

__all__ = ["convert_detrex_state_dict", "load_state_dict"]
