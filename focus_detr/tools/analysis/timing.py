"""Inference latency of a whole model and of its encoder alone."""

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch
from torch import nn

from .inputs import model_inputs

__all__ = ["Latency", "EncoderTimer", "measure_latency", "synchronizer"]


def synchronizer(device: torch.device) -> Callable[[], None]:
    """``torch.cuda.synchronize`` on a CUDA device (queued work counted where it was issued),
    else nothing."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass
class Latency:
    """
    Seconds of the timed forwards (batch 1, one entry per forward).

    Attributes:
        model_times: whole inference (pre-processing to detections).
        encoder_times: the encoder's forward inside each of those inferences.
    """

    model_times: List[float]
    encoder_times: List[float]

    def summary(self) -> Dict[str, object]:
        """Median and fastest milliseconds of the model and the encoder, the number of forwards
        and every forward's milliseconds (to judge the noise)."""
        model_ms = [1000.0 * value for value in self.model_times]
        encoder_ms = [1000.0 * value for value in self.encoder_times]
        return {
            "model_ms": statistics.median(model_ms),
            "encoder_ms": statistics.median(encoder_ms),
            "model_ms_min": min(model_ms),
            "encoder_ms_min": min(encoder_ms),
            "forwards": len(model_ms),
            "model_ms_all": model_ms,
            "encoder_ms_all": encoder_ms,
        }


class EncoderTimer:
    """
    Seconds of every forward of ``module`` from a forward pre-hook to a forward hook, with
    ``synchronize`` called at both ends. Use as a context manager (the hooks are removed on
    exit).
    """

    def __init__(self, module: nn.Module, synchronize: Callable[[], None]):
        self.module = module
        self.synchronize = synchronize
        self.times: List[float] = []
        self._start = None
        self._handles = []

    def _pre_hook(self, module, args) -> None:
        self.synchronize()
        self._start = time.perf_counter()

    def _post_hook(self, module, args, output) -> None:
        self.synchronize()
        self.times.append(time.perf_counter() - self._start)

    def __enter__(self) -> "EncoderTimer":
        self._handles = [
            self.module.register_forward_pre_hook(self._pre_hook),
            self.module.register_forward_hook(self._post_hook),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def measure_latency(
    model: nn.Module, inputs: Sequence[Dict], *, warmup: int, iters: int
) -> Latency:
    """
    ``warmup`` untimed passes, then ``iters`` timed passes over ``inputs``, one image per
    forward (eval mode, no_grad, the model's own precision). The encoder is timed with hooks
    during the same timed inferences.
    """
    if warmup < 0 or iters < 1:
        raise ValueError(f"need warmup >= 0 and iters >= 1, got {warmup} and {iters}")
    if model.training:
        raise ValueError("time a model in eval mode")
    device = next(model.parameters()).device
    sync = synchronizer(device)
    batches = [[item] for item in model_inputs(inputs)]
    model_times: List[float] = []
    with torch.no_grad():
        for _ in range(warmup):
            for batch in batches:
                model(batch)
        with EncoderTimer(model.encoder, sync) as encoder_timer:
            for _ in range(iters):
                for batch in batches:
                    sync()
                    start = time.perf_counter()
                    model(batch)
                    sync()
                    model_times.append(time.perf_counter() - start)
    if len(encoder_timer.times) != len(model_times):
        raise RuntimeError(
            f"the encoder ran {len(encoder_timer.times)} times in {len(model_times)} inferences"
        )
    return Latency(model_times, encoder_timer.times)
