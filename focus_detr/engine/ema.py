"""Exponential moving average of model weights."""

import copy
import math

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["ModelEMA", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel, or ``model`` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class ModelEMA:
    """
    Keeps ``ema = decay_t * ema + (1 - decay_t) * weights`` after every step, with
    ``decay_t = decay * (1 - exp(-updates / warmup))`` so early averages follow the model closely.
    Buffers are copied, not averaged. A checkpointable: the detectron2 checkpointer saves and
    restores it through ``state_dict``/``load_state_dict``.
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.9998, warmup: int = 2000):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        if warmup < 0:
            raise ValueError(f"EMA warmup must be >= 0, got {warmup}")
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.updates = 0

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Set the average to ``model``'s current weights, e.g. after loading a checkpoint."""
        self.module.load_state_dict(unwrap_model(model).state_dict())

    def current_decay(self) -> float:
        if self.warmup == 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-self.updates / self.warmup))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = self.current_decay()
        source = unwrap_model(model).state_dict()
        for name, target in self.module.state_dict().items():
            value = source[name].detach()
            if target.dtype.is_floating_point:
                target.mul_(decay).add_(value.to(target.dtype), alpha=1.0 - decay)
            else:
                target.copy_(value)

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state_dict: dict) -> None:
        self.module.load_state_dict(state_dict["model"])
        self.updates = int(state_dict["updates"])
