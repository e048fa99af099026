"""
Where the time of a training step goes: wall time per section from hooks on the model's
submodules, the trainer (after backward) and the optimizer (step pre / post).
"""

import time
from collections import defaultdict
from typing import Callable, Dict, List, Optional

import torch
from detectron2.engine import HookBase

__all__ = ["MODULE_NAMES", "StepTimer", "section_names"]

# Submodules of a DETR-style detector timed separately (those a model lacks are skipped).
MODULE_NAMES = ("backbone", "neck", "encoder", "query_selection", "decoder", "criterion")
FORWARD_OTHER = "forward (other)"
BACKWARD = "loss sum + backward"
CLIP = "grad clipping + metrics"
OPTIMIZER = "optimizer step"


def _timed_modules(model: torch.nn.Module) -> List[str]:
    return [n for n in MODULE_NAMES if isinstance(getattr(model, n, None), torch.nn.Module)]


def section_names(model: torch.nn.Module, *, training: bool) -> List[str]:
    """The sections :class:`StepTimer` reports for ``model``, in the order of a step."""
    names = _timed_modules(model)
    if not training and "criterion" in names:
        names.remove("criterion")  # losses: training only
    names.append(FORWARD_OTHER)
    return names + [BACKWARD, CLIP, OPTIMIZER] if training else names


class _AfterBackward(HookBase):
    def __init__(self, callback: Callable[[], None]):
        self.callback = callback

    def after_backward(self) -> None:
        self.callback()


class StepTimer:
    """
    Seconds per section, summed over the steps run while attached:

    - each of :data:`MODULE_NAMES` the model has: its forward, without the time of another
      timed module it calls;
    - ``forward (other)``: the rest of the model's forward (pre-processing, embeddings,
      denoising queries, post-processing);
    - training only: ``loss sum + backward`` (model output to the trainer's ``after_backward``),
      ``grad clipping + metrics`` (to the optimizer step) and ``optimizer step``.

    ``synchronize`` is called at every boundary (``torch.cuda.synchronize`` on a GPU, else
    nothing), so that the GPU's queued work is counted where it was issued.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        optimizer: Optional[torch.optim.Optimizer] = None,
        trainer=None,
        synchronize: Callable[[], None] = lambda: None,
    ):
        self.synchronize = synchronize
        self.totals: Dict[str, float] = defaultdict(float)
        self._stack: List[list] = []  # [name, start, seconds spent in timed children]
        self._mark: Optional[float] = None  # end of the last section of the step
        self._handles = []
        named = [(name, getattr(model, name)) for name in _timed_modules(model)]
        for name, module in [("forward", model)] + named:
            self._handles.append(module.register_forward_pre_hook(self._enter_hook(name)))
            self._handles.append(module.register_forward_hook(self._exit_hook, always_call=True))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._before_optimizer))
            self._handles.append(optimizer.register_step_post_hook(self._after_optimizer))
        if trainer is not None:
            trainer.register_hooks([_AfterBackward(self._after_backward)])

    def _now(self) -> float:
        self.synchronize()
        return time.perf_counter()

    def _enter_hook(self, name: str):
        def hook(module, inputs) -> None:
            self._stack.append([name, self._now(), 0.0])

        return hook

    def _exit_hook(self, module, inputs, output) -> None:
        now = self._now()
        name, start, children = self._stack.pop()
        elapsed = now - start
        self.totals[FORWARD_OTHER if name == "forward" else name] += elapsed - children
        if self._stack:
            self._stack[-1][2] += elapsed
        else:
            self._mark = now

    def _close(self, section: str) -> None:
        now = self._now()
        if self._mark is not None:
            self.totals[section] += now - self._mark
        self._mark = now

    def _after_backward(self) -> None:
        self._close(BACKWARD)

    def _before_optimizer(self, optimizer, args, kwargs) -> None:
        self._close(CLIP)

    def _after_optimizer(self, optimizer, args, kwargs) -> None:
        self._close(OPTIMIZER)

    def reset(self) -> None:
        """Forget the times so far (e.g. those of warm-up steps)."""
        self.totals.clear()
        self._stack.clear()
        self._mark = None

    def remove(self) -> None:
        """Detach the module and optimizer hooks (the trainer hook stays with its trainer)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
