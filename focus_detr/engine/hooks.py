"""Training hooks that detectron2 does not provide."""

from detectron2.engine import HookBase
from detectron2.utils import comm

from focus_detr.data.seeding import STEP_STREAM, derive_seed, seed_global_rngs

__all__ = ["BoundedHistoryHook", "IterationSeedHook"]


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


class BoundedHistoryHook(HookBase):
    """
    Keeps at most ``max_length`` values of every scalar in the trainer's ``EventStorage``.

    detectron2 stores every scalar of every step (a ``HistoryBuffer`` holds up to a million
    values), so its memory grows with the length of the schedule. Its writers read the latest
    value, medians over ``window_size`` (20) steps, the ETA's median over 1000 steps and running
    global averages (kept whatever is dropped), so with ``max_length >= 1000`` every logged
    number is unchanged. Register it after the writers.
    """

    def __init__(self, max_length: int = 1000):
        if max_length < 1000:
            raise ValueError(
                "max_length must be >= 1000 (the ETA is a median over 1000 steps), "
                f"got {max_length}"
            )
        self.max_length = max_length

    def after_step(self) -> None:
        for history in self.trainer.storage.histories().values():
            # fvcore's HistoryBuffer drops its oldest value once it holds _max_length values
            if history._max_length > self.max_length:
                history._max_length = self.max_length
                del history._data[: -self.max_length]
