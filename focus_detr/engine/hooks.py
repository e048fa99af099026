"""Training hooks that detectron2 does not provide."""

import logging
import os

from detectron2.engine import HookBase
from detectron2.utils import comm

from focus_detr.allocator import jemalloc_default_decay, jemalloc_purge, jemalloc_set_decay

from .seeding import STEP_STREAM, derive_seed, seed_global_rngs

__all__ = ["AllocatorPurgeHook", "BoundedHistoryHook", "DEFAULT_PURGE_PERIOD", "IterationSeedHook"]

# iterations between two jemalloc purges in training (AllocatorPurgeHook)
DEFAULT_PURGE_PERIOD = 50

logger = logging.getLogger(__name__)


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
    values): with ~25 loss terms that is ~3 KiB more memory per step, ~270 MiB over a 90k-step
    schedule. Its writers read the latest value, medians over ``window_size`` (20) steps, the
    ETA's median over 1000 steps and running global averages (kept whatever is dropped), so
    with ``max_length >= 1000`` every logged number is unchanged. Register it after the writers.
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


class AllocatorPurgeHook(HookBase):
    """
    Under jemalloc (``focus_detr.allocator``), keeps the pages that training steps free until
    every ``period``-th iteration and then returns all unused ones to the operating system.

    jemalloc's own policy returns unused pages gradually (its ``dirty_decay_ms``), including
    pages the next step allocates again, which the kernel then has to fault in and zero: the
    demo's training step took 1.02-1.08x as long as under glibc's malloc with it, and 0.90-0.96x
    with this policy (``scripts/benchmark_allocators.sh``, README). With decay off and no purge
    the resident memory grows with every new peak (``focus_detr.tools.soak``: +560 MiB in 500
    iterations); a full purge every ``period`` iterations bounds it.

    Decay is turned off after the first step, when the training loader's worker processes have
    started (they keep jemalloc's default policy; the short-lived workers of evaluations during
    and after training fork with decay off), and restored after training. Nothing is changed
    when ``MALLOC_CONF`` sets a decay or jemalloc is not loaded, and the hook turns itself off
    with a warning when jemalloc refuses a control (e.g. a jemalloc 4 without these settings).
    """

    def __init__(self, *, period: int = DEFAULT_PURGE_PERIOD):
        if period < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        self.period = period
        self._restore = None

    def after_step(self) -> None:
        iteration = self.trainer.iter
        if iteration == self.trainer.start_iter:
            self._start()
        if self._restore is not None and (iteration + 1) % self.period == 0:
            try:
                jemalloc_purge()
            except OSError as error:
                self._stop(error)

    def after_train(self) -> None:
        if self._restore is not None:
            jemalloc_set_decay(*self._restore)
            self._restore = None

    def _start(self) -> None:
        if "decay" in os.environ.get("MALLOC_CONF", ""):
            return
        try:
            default = jemalloc_default_decay()
            if default is None or not jemalloc_set_decay(-1, -1):
                return
        except OSError as error:
            self._restore = None
            logger.warning(f"jemalloc: its purge policy is off, a control failed: {error}")
            return
        self._restore = default
        logger.info(
            f"jemalloc: unused pages kept between steps and returned every {self.period} "
            f"iterations (decay {default[0]} ms / {default[1]} ms restored after training)"
        )

    def _stop(self, error: OSError) -> None:
        logger.warning(f"jemalloc: purge failed ({error}); its own decay policy restored")
        restore, self._restore = self._restore, None
        try:
            jemalloc_set_decay(*restore)
        except OSError as second:
            logger.warning(f"jemalloc: restoring its decay failed too: {second}")
