"""Training hooks that detectron2 does not provide."""

import random

import numpy as np
import torch
from detectron2.engine import HookBase

__all__ = ["RNGStateHook"]


class RNGStateHook(HookBase):
    """
    Puts the Python, NumPy and torch random states in every checkpoint and restores them on
    resume, so that a resumed run draws the same denoising noise and augmentations as an
    uninterrupted one. It owns no state of its own: the states are read when a checkpoint is
    written and applied when one is loaded.
    """

    def state_dict(self) -> dict:
        return {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        random.setstate(state_dict["python"])
        np.random.set_state(state_dict["numpy"])
        torch.set_rng_state(state_dict["torch"])
        cuda_states = state_dict.get("cuda", [])
        if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
