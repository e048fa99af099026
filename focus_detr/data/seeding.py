"""
Random streams that depend on where they are used, not on what ran before.

A resumed run cannot rebuild the random states of the run it continues: its data loader workers
start afresh, and anything that drew numbers between a checkpoint and the kill is gone. So the
training randomness is derived from keys that a resumed run knows as well:

* each training sample's augmentation from ``(run seed, global sample position)``, wherever the
  sample is mapped (main process or any loader worker);
* each training step's randomness (denoising noise, dropout) from ``(run seed, rank, iteration)``.
"""

import contextlib
import random
from typing import Iterator

import numpy as np
import torch

__all__ = ["SAMPLE_STREAM", "STEP_STREAM", "derive_seed", "seed_global_rngs", "seeded_cpu_rngs"]

# First key after the run seed: keeps the streams of samples and of steps apart.
SAMPLE_STREAM = 0
STEP_STREAM = 1


def derive_seed(*keys: int) -> int:
    """
    A 32-bit seed derived from non-negative integer ``keys`` with NumPy's ``SeedSequence``:
    well mixed, so that nearby keys (positions 7 and 8) give unrelated streams.
    """
    for key in keys:
        if int(key) < 0:
            raise ValueError(f"seed keys must be non-negative integers, got {keys}")
    return int(np.random.SeedSequence([int(key) for key in keys]).generate_state(1)[0])


def seed_global_rngs(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch's generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded_cpu_rngs(seed: int) -> Iterator[None]:
    """
    Inside the block Python's ``random``, NumPy's global generator and torch's CPU generator are
    seeded with ``seed``; their previous states are restored afterwards, so that mapping a
    sample in the main process does not disturb the training step's random stream.
    """
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    torch_state = torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.random.set_rng_state(torch_state)
