"""Training hooks that detectron2 does not provide."""

from detectron2.engine import HookBase
from detectron2.utils import comm

from .seeding import STEP_STREAM, derive_seed, seed_global_rngs

__all__ = ["IterationSeedHook"]


class IterationSeedHook(HookBase):
    """
    Before every step, seeds Python's ``random``, NumPy and torch (all devices) from
    ``(trainer.seed, rank, iteration)``: the denoising noise and any other randomness of step
    ``i`` of process ``r`` are the same in an uninterrupted run and in a run resumed before
    ``i``, whatever happened in between (loader start-up, evaluation, a kill), and each process
    has its own stream.

    ``trainer.seed`` is the run seed, saved in checkpoints by :class:`DETRTrainer`; no random
    state needs to be saved. Register this hook first, so that the other hooks' ``before_step``
    draw from the step's stream too.
    """

    def before_step(self) -> None:
        seed = getattr(self.trainer, "seed", None)
        if seed is None:
            raise RuntimeError("IterationSeedHook needs trainer.seed (the run seed) to be set")
        seed_global_rngs(derive_seed(seed, STEP_STREAM, comm.get_rank(), self.trainer.iter))
