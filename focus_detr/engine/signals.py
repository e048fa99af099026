"""
SIGINT (Ctrl-C) and SIGTERM (schedulers, ``kill``) stop training at a step boundary with a
checkpoint, so that ``--resume`` continues exactly where the run stopped.

detectron2's trainer dies on either signal and keeps only its last periodic checkpoint (the demo
config writes one at its last iteration only). :class:`StopOnSignalHook` catches both signals
during training: the step in progress finishes, its hooks run (LR schedule, periodic checkpoint,
evaluation, metrics), the main process saves ``model_{iteration:07d}.pth`` atomically
(:class:`~focus_detr.engine.checkpoint.SafeCheckpointer`) and every process raises
:class:`TrainingInterrupted`. With several processes, they agree at every step on whether any of
them received a signal (a one-integer all-reduce on the CPU), so all stop after the same step.
A second signal while stopping is ignored (SIGKILL stops at once, losing the current step).
Loader workers must outlive the signal until the step ends: :func:`ignore_stop_signals_in_workers`
makes them ignore it unless their trainer sends it, whether they are forked or spawned.
"""

import logging
import multiprocessing
import os
import signal
import threading
from typing import Dict

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = [
    "STOP_SIGNALS",
    "StopOnSignalHook",
    "TrainingInterrupted",
    "forward_stop_signals_to_children",
    "ignore_stop_signals_in_workers",
]

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(BaseException):
    """
    Training stopped on a signal after saving a checkpoint; the message says how to resume.
    A ``BaseException``, like ``KeyboardInterrupt``, so that handlers of errors let it pass.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """128 + the signal number: the shell's status of a process stopped by that signal."""
        return 128 + self.signum


def _say(message: str) -> None:
    # logging is not safe inside a signal handler (it may hold the handler's lock)
    os.write(2, f"\n{message}\n".encode())


class StopOnSignalHook(HookBase):
    """
    See the module doc. Register it after every hook that runs in ``after_step`` (the
    checkpointer, evaluation and writers), in every process. Its handlers are installed for the
    training loop only (from ``before_train`` to the end of the last step); after the last step
    the final evaluation can be interrupted as usual, the weights being saved.
    """

    def __init__(self, checkpointer):
        """
        Args:
            checkpointer: the run's checkpointer (saves only in the main process).
        """
        self.checkpointer = checkpointer
        self.received = 0
        self._previous: Dict[int, object] = {}

    def before_train(self) -> None:
        if comm.get_world_size() > 1:
            comm._get_global_gloo_group()  # created now, by every process together
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Training runs outside the main thread: signals stop it at once")
            return
        self._pid = os.getpid()
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return  # a process forked from the trainer: the trainer stops it
        name = signal.Signals(signum).name
        if self.received:
            _say(f"{name}: already stopping after the current step (SIGKILL stops at once)")
            return
        self.received = signum
        _say(
            f"{name} received: finishing iteration {self.trainer.iter}, then saving a "
            f"checkpoint and stopping"
        )

    def _agreed_signal(self) -> int:
        if comm.get_world_size() == 1:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=comm._get_global_gloo_group())
        return int(flag[0])

    def after_step(self) -> None:
        signum = self._agreed_signal()
        iteration = self.trainer.iter
        if iteration + 1 >= self.trainer.max_iter:
            self._restore()
            if signum:
                logger.warning(
                    f"{signal.Signals(signum).name} received during the last iteration: the "
                    f"final weights are saved; the final evaluation runs (a second signal stops it)"
                )
            return
        if not signum:
            return
        name = f"model_{iteration:07d}"
        path = os.path.join(self.checkpointer.save_dir or "", f"{name}.pth")
        if comm.is_main_process():
            saved = self.checkpointer.has_checkpoint()
            last = self.checkpointer.get_checkpoint_file() if saved else ""
            if os.path.basename(last) != f"{name}.pth":  # not just saved by the periodic one
                self.checkpointer.save(name, iteration=iteration)
        comm.synchronize()
        raise TrainingInterrupted(
            f"Training stopped by {signal.Signals(signum).name} after iteration {iteration}: "
            f"{path} is saved. Run the same command with --resume to continue from iteration "
            f"{iteration + 1}",
            signum,
        )

    def after_train(self) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def forward_stop_signals_to_children() -> None:
    """
    In a process that launched the training processes (detectron2's ``launch`` with several
    processes): pass SIGINT and SIGTERM on to them instead of dying, so that they stop at a step
    boundary with a checkpoint; the launcher then exits with their status.
    """

    def forward(signum, frame) -> None:
        for child in multiprocessing.active_children():
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:
                pass

    for signum in STOP_SIGNALS:
        signal.signal(signum, forward)


def _obey_sigterm_of(parent: int) -> None:
    """Wait for SIGTERM (blocked in every thread); die of the one ``parent`` sends, only."""
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to this thread: default action


class _IgnoreStopSignals:
    """
    A loader's ``worker_init_fn``: ignore SIGINT; ignore SIGTERM too, except from the trainer
    (which terminates its workers with it when it exits); then run ``then`` (if any).
    """

    def __init__(self, then=None):
        self.then = then

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if hasattr(signal, "sigwaitinfo"):  # not on macOS: SIGTERM keeps its default there
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            # threads started from now on inherit the mask; the worker has none before
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            threading.Thread(
                target=_obey_sigterm_of, args=(os.getppid(),), daemon=True, name="sigterm"
            ).start()
        if self.then is not None:
            self.then(worker_id)


def ignore_stop_signals_in_workers(loader):
    """
    ``loader`` (a ``torch.utils.data.DataLoader`` with workers; anything else is returned as it
    is), its workers ignoring SIGINT and SIGTERM from anyone but their trainer: a Ctrl-C reaches
    every process of the terminal's process group, and a scheduler's SIGTERM often every process
    of the job, and a worker that died of it would fail the step that the trainer finishes
    before it stops. The trainer still shuts its workers down (SIGTERM included), and they exit
    when it dies.
    """
    if (
        isinstance(loader, torch.utils.data.DataLoader)
        and loader.num_workers > 0
        and not isinstance(loader.worker_init_fn, _IgnoreStopSignals)
    ):
        loader.worker_init_fn = _IgnoreStopSignals(loader.worker_init_fn)
    return loader
