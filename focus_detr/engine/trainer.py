"""The training loop of DETR-style models: gradient clipping, AMP on any device, optional EMA."""

import time
from typing import Optional

import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils.events import get_event_storage
from torch.nn.utils import clip_grad_norm_

from .ema import ModelEMA
from .nonfinite import NonFiniteStepGuard, all_processes_finite

__all__ = ["DETRTrainer"]


class DETRTrainer(SimpleTrainer):
    """
    :class:`detectron2.engine.SimpleTrainer` with what DETR training needs and detectron2's
    trainers lack: global L2 gradient clipping (after unscaling under AMP), mixed precision on
    CPU (bfloat16) as well as CUDA (float16 with a gradient scaler, or bfloat16), an exponential
    moving average of the weights updated after every step, and a policy for NaN or infinite
    losses (stop, or skip up to N steps in a row: :class:`NonFiniteStepGuard`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        data_loader,
        optimizer: torch.optim.Optimizer,
        *,
        clip_grad_max_norm: Optional[float] = 0.1,
        amp: bool = False,
        amp_dtype: Optional[torch.dtype] = None,
        ema: Optional[ModelEMA] = None,
        max_consecutive_nonfinite: int = 0,
        gather_metric_period: int = 1,
    ):
        """
        Args:
            model, data_loader, optimizer: as in :class:`SimpleTrainer`.
            clip_grad_max_norm: max L2 norm of all gradients together; None or <= 0 disables.
            amp: run forward and loss under ``torch.autocast`` (a bool: ``"auto"`` is decided by
                :func:`focus_detr.engine.precision.resolve_amp`).
            amp_dtype: autocast dtype; default float16 on CUDA, bfloat16 on CPU.
            ema: weights average updated after every optimizer step.
            max_consecutive_nonfinite: 0 stops at the first non-finite loss; N > 0 skips such
                steps and stops after N skipped in a row.
        """
        if not isinstance(amp, bool):
            raise ValueError(f"amp must be True or False, got {amp!r} (resolve 'auto' first)")
        super().__init__(model, data_loader, optimizer, gather_metric_period=gather_metric_period)
        device = next(model.parameters()).device
        self.device_type = device.type
        self.clip_grad_max_norm = clip_grad_max_norm
        self.amp = amp
        if amp_dtype is None:
            amp_dtype = torch.float16 if self.device_type == "cuda" else torch.bfloat16
        self.amp_dtype = amp_dtype
        # float16 needs loss scaling; bfloat16 has float32's exponent range and does not.
        self.grad_scaler = torch.amp.GradScaler(
            self.device_type, enabled=amp and amp_dtype == torch.float16
        )
        self.ema = ema
        self.nonfinite = NonFiniteStepGuard(max_consecutive=max_consecutive_nonfinite)
        # The run seed: data order, each sample's augmentation and each step's randomness derive
        # from it (see focus_detr.data.seeding). Saved in checkpoints, so that a resumed run
        # continues the streams of the run it resumes even when the config's seed is random.
        self.seed: Optional[int] = None

    def run_step(self) -> None:
        assert self.model.training, "[DETRTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        buffers = self.nonfinite.snapshot(self.model)
        with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp):
            loss_dict = self.model(data)
            losses = sum(loss_dict.values())
        if not all_processes_finite(losses):
            self.nonfinite.step_failed(self.iter, "loss", loss_dict, self.model, buffers)
            return
        self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        self.after_backward()
        if self.clip_grad_max_norm is not None and self.clip_grad_max_norm > 0:
            self.grad_scaler.unscale_(self.optimizer)
            grad_norm = clip_grad_norm_(self.model.parameters(), self.clip_grad_max_norm)
            # Under float16 loss scaling the scaler skips steps with infinite gradients itself.
            if not self.grad_scaler.is_enabled() and not torch.isfinite(grad_norm):
                self.optimizer.zero_grad()
                terms = {"grad_norm": grad_norm, **loss_dict}
                self.nonfinite.step_failed(self.iter, "gradient norm", terms, self.model, buffers)
                return
            get_event_storage().put_scalar("grad_norm", float(grad_norm), smoothing_hint=True)
        self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        self.nonfinite.step_succeeded()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["grad_scaler"] = self.grad_scaler.state_dict()
        state["nonfinite"] = self.nonfinite.state_dict()
        if self.seed is not None:
            state["seed"] = self.seed
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        if "nonfinite" in state_dict:
            self.nonfinite.load_state_dict(state_dict["nonfinite"])
        # "data_seed": the name in checkpoints of earlier versions
        seed = state_dict.get("seed", state_dict.get("data_seed"))
        if seed is not None:
            self.seed = int(seed)
