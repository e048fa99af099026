"""What a training step does when its loss or gradient norm is NaN or infinite."""

import logging
from typing import Dict, List, Mapping, Optional

import torch
import torch.distributed as dist
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

__all__ = ["NonFiniteLossError", "NonFiniteStepGuard", "all_processes_finite"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training stopped on a NaN or infinite loss (or gradient norm); the message says where."""

    def __init__(self, message: str, iteration: Optional[int] = None):
        super().__init__(message)
        self.iteration = iteration


def all_processes_finite(value: torch.Tensor) -> bool:
    """
    Whether ``value`` is finite in every process. With several processes this is one tiny
    all-reduce, so that all processes skip (or stop at) the same step: a process that skipped
    its backward alone would leave the others waiting in the gradient all-reduce.
    """
    flag = torch.isfinite(value.detach()).all().to(torch.int32)
    if comm.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _format_terms(terms: Mapping[str, torch.Tensor]) -> str:
    return ", ".join(
        f"{name}={float(torch.as_tensor(value).detach()):.4g}" for name, value in terms.items()
    )


class NonFiniteStepGuard:
    """
    Stops training at the first non-finite loss, or with ``max_consecutive > 0`` skips such steps
    (no backward, no optimizer or EMA update, the model's buffers such as BatchNorm statistics
    put back as they were before the step) and stops only after ``max_consecutive`` skipped
    steps in a row. Skipped steps are logged with the loss terms and counted in the event
    storage (``skipped_steps``) and in checkpoints.
    """

    def __init__(self, *, max_consecutive: int = 0):
        if max_consecutive < 0:
            raise ValueError(f"max_consecutive must be >= 0, got {max_consecutive}")
        self.max_consecutive = int(max_consecutive)
        self.consecutive = 0
        self.total = 0

    def snapshot(self, model: torch.nn.Module) -> Optional[List[torch.Tensor]]:
        """Copies of ``model``'s buffers when steps may be skipped (else None: nothing to undo)."""
        if self.max_consecutive == 0:
            return None
        return [buffer.detach().clone() for buffer in model.buffers()]

    def step_succeeded(self) -> None:
        self.consecutive = 0

    def step_failed(
        self,
        iteration: int,
        what: str,
        terms: Mapping[str, torch.Tensor],
        model: torch.nn.Module,
        snapshot: Optional[List[torch.Tensor]],
    ) -> None:
        """
        Handle step ``iteration`` whose ``what`` ("loss", "gradient norm") is not finite:
        raise :class:`NonFiniteLossError`, or skip the step (restore ``model``'s buffers from
        ``snapshot``) and return.
        """
        description = f"{what} is infinite or NaN at iteration {iteration}: {_format_terms(terms)}"
        if self.consecutive >= self.max_consecutive:
            if self.max_consecutive == 0:
                advice = (
                    "set train.skip_nonfinite.max_consecutive=N to skip up to N such steps in a "
                    "row instead"
                )
            else:
                advice = f"{self.consecutive} steps before it were skipped in a row"
            raise NonFiniteLossError(f"Training stopped: {description} ({advice})", iteration)
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), snapshot or []):
                buffer.copy_(saved)
        self.consecutive += 1
        self.total += 1
        logger.warning(
            f"Skipped the step: {description}. {self.consecutive} skipped in a row "
            f"(stop after {self.max_consecutive}), {self.total} in total"
        )
        get_event_storage().put_scalar("skipped_steps", self.total, smoothing_hint=False)

    def state_dict(self) -> Dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state_dict: Mapping[str, int]) -> None:
        self.consecutive = int(state_dict["consecutive"])
        self.total = int(state_dict["total"])
