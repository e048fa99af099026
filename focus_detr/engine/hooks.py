"""Training hooks that detectron2 does not provide."""

import random
from typing import Optional

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["RNGStateHook"]


class RNGStateHook(HookBase):
    """
    Puts the Python, NumPy and torch random states in every checkpoint and restores them on
    resume, so that a resumed run draws the same denoising noise and augmentations as an
    uninterrupted one.

    The states are read when a checkpoint is written. Loaded states are applied in
    ``before_train``, not at load time: the trainer creates its data loader iterator (which draws
    a seed from torch's global generator) before the hooks' ``before_train``, and an
    uninterrupted run has made that draw before its checkpoints were written too. Register this
    hook last so that no other ``before_train`` draws after the restore.

    Only the main process writes checkpoints, so they hold its states, and only the main
    process restores them: the other processes keep their own streams (``default_setup`` seeds
    each process differently) rather than all drawing the main process's numbers. A resumed
    multi-process run therefore repeats the main process's randomness only.

    The states are stored as tensors, ints and lists only, so that checkpoints load with
    ``torch.load(weights_only=True)`` (the default since PyTorch 2.6).
    """

    def __init__(self):
        self._pending_state: Optional[dict] = None

    def state_dict(self) -> dict:
        name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        return {
            "python": random.getstate(),
            "numpy": {
                "name": str(name),
                "keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
                "position": int(position),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached_gaussian),
            },
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending_state = state_dict

    def before_train(self) -> None:
        if self._pending_state is not None and comm.is_main_process():
            _set_rng_states(self._pending_state)
        self._pending_state = None


def _set_rng_states(state_dict: dict) -> None:
    python_state = state_dict["python"]
    # torch.load may give lists where random.getstate() had tuples
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    numpy_state = state_dict["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            np.asarray(numpy_state["keys"], dtype=np.int64).astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state_dict["torch"])
    cuda_states = state_dict.get("cuda", [])
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
