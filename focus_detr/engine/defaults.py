"""Building blocks of ``train_net.py`` that tools share: the model, its DDP wrapper, its weights."""

import logging
from typing import Callable, Optional, TypeVar

import torch
from detectron2.config import instantiate
from detectron2.engine.defaults import create_ddp_model
from detectron2.utils import comm
from omegaconf import OmegaConf

from .checkpoint import SafeCheckpointer

__all__ = ["FileNamingModel", "InferenceError", "build_model", "load_for_eval", "on_main_process"]
__all__ += ["wrap_ddp"]

logger = logging.getLogger("detectron2")
_T = TypeVar("_T")


def on_main_process(check: Callable[[], _T]) -> _T:
    """``check()`` run by the main process only; its result, or its error, in every process."""
    if comm.get_world_size() == 1:
        return check()
    result = error = None
    if comm.is_main_process():
        try:
            result = check()
        except Exception as raised:
            error = raised
    result, error = comm.all_gather((result, error))[0]
    if error is not None:
        raise error
    return result


def build_model(cfg) -> torch.nn.Module:
    """Instantiate ``cfg.model`` on ``cfg.train.device`` (falls back to CPU without CUDA)."""
    model = instantiate(cfg.model)
    device = cfg.train.device
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning(f"train.device={device} but CUDA is not available: using the CPU")
        device = "cpu"
        cfg.train.device = device
    return model.to(device)


def wrap_ddp(model: torch.nn.Module, **ddp_kwargs) -> torch.nn.Module:
    """``create_ddp_model`` that also works for CPU models (gloo): no ``device_ids`` there."""
    if next(model.parameters()).device.type == "cpu":
        ddp_kwargs["device_ids"] = None
    return create_ddp_model(model, **ddp_kwargs)


def load_for_eval(cfg, model: torch.nn.Module, checkpoint: Optional[str] = None) -> None:
    """Load ``checkpoint`` (default ``cfg.train.init_checkpoint``); EMA weights when saved."""
    path = checkpoint or cfg.train.init_checkpoint
    if not path:
        logger.warning("No checkpoint to evaluate (train.init_checkpoint is empty)")
    extra = SafeCheckpointer(model).load(path)
    if OmegaConf.select(cfg, "train.ema.enabled", default=False) and "ema" in extra:
        model.load_state_dict(extra["ema"]["model"])
        logger.info(f"Loaded the EMA weights of {path}")


class InferenceError(RuntimeError):
    """The model failed on a batch; the message names the batch's image files."""


class FileNamingModel(torch.nn.Module):
    """
    Runs ``model`` on dataset-mapper dicts; any exception is raised again as
    :class:`InferenceError` naming the ``file_name`` of every input of the batch (e.g. an image
    the model cannot take, in evaluation: detectron2's ``inference_on_dataset`` names none).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batched_inputs):
        try:
            return self.model(batched_inputs)
        except Exception as error:
            names = [str(x.get("file_name", "(no file_name)")) for x in batched_inputs]
            raise InferenceError(
                f"The model failed on {', '.join(names)}: {type(error).__name__}: {error}"
            ) from error
