"""
The one timer of the benchmarks and the analysis: seconds of repeated calls, where they go by
module (forward hooks) and by training phase, and ``torch.profiler``'s table on request.
"""

import time
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence

import torch
from detectron2.engine import HookBase

__all__ = ["SectionTimer", "profile_table", "synchronizer", "time_runs"]

# Submodules of a DETR-style detector timed separately (those a model lacks are skipped).
MODULE_NAMES = ("backbone", "neck", "encoder", "query_selection", "decoder", "criterion")
FORWARD_OTHER = "forward (other)"
BACKWARD = "loss sum + backward"
CLIP = "grad clipping + metrics"
OPTIMIZER = "optimizer step"


def synchronizer(device) -> Callable[[], None]:
    """``torch.cuda.synchronize`` on a CUDA device (queued work counted where it was issued),
    else nothing."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_runs(
    run: Callable[[], None],
    *,
    warmup: int,
    iters: int,
    device="cpu",
    sections: Optional["SectionTimer"] = None,
) -> List[float]:
    """
    Seconds of each of ``iters`` calls of ``run`` after ``warmup`` untimed ones, the device
    synchronized before and after each call. ``sections`` forgets the warm-up.
    """
    if warmup < 0 or iters < 1:
        raise ValueError(f"need warmup >= 0 and iters >= 1, got {warmup} and {iters}")
    sync = synchronizer(device)
    for _ in range(warmup):
        run()
    if sections is not None:
        sections.reset()
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return times


class _AfterBackward(HookBase):
    def __init__(self, callback: Callable[[], None]):
        self.callback = callback

    def after_backward(self) -> None:
        self.callback()


class SectionTimer:
    """
    Seconds of every call of each section while attached (``times[name]``, one entry per call):

    - each of ``modules`` the model has (default: backbone, neck, encoder, query selection,
      decoder, criterion): its forward, without the time of another timed module it calls;
    - ``forward (other)``: the rest of the model's forward;
    - with a trainer and optimizer: ``loss sum + backward`` (model output to the trainer's
      ``after_backward``), ``grad clipping + metrics`` (to the optimizer step) and
      ``optimizer step``.

    The device is synchronized at every boundary. :meth:`remove` detaches the hooks.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        modules: Sequence[str] = MODULE_NAMES,
        optimizer: Optional[torch.optim.Optimizer] = None,
        trainer=None,
    ):
        self.device = next(model.parameters()).device
        self._sync = synchronizer(self.device)
        self.times: Dict[str, List[float]] = defaultdict(list)
        self._stack: List[list] = []  # [name, start, seconds spent in timed children]
        self._mark: Optional[float] = None  # end of the last section of the step
        modules = [n for n in modules if isinstance(getattr(model, n, None), torch.nn.Module)]
        self.names = modules + [FORWARD_OTHER]
        self._handles = []
        for name, module in [("forward", model)] + [(n, getattr(model, n)) for n in modules]:
            self._handles.append(module.register_forward_pre_hook(self._enter_hook(name)))
            self._handles.append(module.register_forward_hook(self._exit_hook, always_call=True))
        if optimizer is not None and trainer is not None:
            self.names += [BACKWARD, CLIP, OPTIMIZER]
            self._handles.append(optimizer.register_step_pre_hook(lambda *a: self._close(CLIP)))
            self._handles.append(
                optimizer.register_step_post_hook(lambda *a: self._close(OPTIMIZER))
            )
            trainer.register_hooks([_AfterBackward(lambda: self._close(BACKWARD))])

    def _now(self) -> float:
        self._sync()
        return time.perf_counter()

    def _enter_hook(self, name: str):
        def hook(module, inputs) -> None:
            self._stack.append([name, self._now(), 0.0])

        return hook

    def _exit_hook(self, module, inputs, output) -> None:
        now = self._now()
        name, start, children = self._stack.pop()
        elapsed = now - start
        self.times[FORWARD_OTHER if name == "forward" else name].append(elapsed - children)
        if self._stack:
            self._stack[-1][2] += elapsed
        else:
            self._mark = now

    def _close(self, section: str) -> None:
        now = self._now()
        if self._mark is not None:
            self.times[section].append(now - self._mark)
        self._mark = now

    def totals(self) -> Dict[str, float]:
        """Seconds of every section that ran (in step order), summed over its calls."""
        return {name: sum(self.times[name]) for name in self.names if name in self.times}

    def reset(self) -> None:
        """Forget the times so far (e.g. those of warm-up steps)."""
        self.times.clear()
        self._stack.clear()
        self._mark = None

    def remove(self) -> None:
        """Detach the module and optimizer hooks (a trainer hook stays with its trainer)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def profile_table(run: Callable[[], None], *, rows: int = 25) -> str:
    """``torch.profiler``'s table of one call of ``run`` (CPU, and CUDA when available), the
    ``rows`` ops with the most self time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        run()
    return profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
