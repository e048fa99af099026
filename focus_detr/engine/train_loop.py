"""Training and evaluation driven by a LazyConfig (the body of ``train_net.py``)."""

import logging
from collections import OrderedDict
from typing import Optional

import torch
from detectron2.config import instantiate
from detectron2.engine import default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from omegaconf import OmegaConf

from .checkpoint import SafeCheckpointer, find_intact_checkpoint
from .data_loader import build_resumable_train_loader
from .ema import ModelEMA
from .hooks import AllocatorPurgeHook, BoundedHistoryHook, IterationSeedHook
from .nonfinite import NonFiniteLossError
from .precision import amp_from_config
from .preflight import run_preflight
from .trainer import DETRTrainer

__all__ = ["build_model", "do_test", "do_train", "load_for_eval", "wrap_ddp"]

logger = logging.getLogger("detectron2")


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


def do_test(cfg, model: torch.nn.Module) -> OrderedDict:
    """Run ``cfg.dataloader.evaluator`` on ``cfg.dataloader.test``; prints the COCO table."""
    if "evaluator" not in cfg.dataloader:
        return OrderedDict()
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    if comm.is_main_process():
        print_csv_format(results)
    return results


def do_train(cfg, *, resume: bool = False) -> OrderedDict:
    """
    Train ``cfg.model`` as the config says and return the last evaluation's results.

    Before anything is built, :func:`~focus_detr.engine.preflight.run_preflight` checks the
    output directory, the dataset names, annotation files and images.

    With ``resume=True`` the last checkpoint of ``cfg.train.output_dir`` is loaded with the
    iteration, optimizer, LR schedule, grad scaler, EMA and run seed; the data stream continues
    with the batches an uninterrupted run would have seen, and every step's randomness derives
    from (seed, rank, iteration): with a fixed seed the resumed run equals the uninterrupted one.

    A NaN or infinite loss stops training with :class:`NonFiniteLossError` naming the iteration,
    the loss terms and the intact checkpoint to resume from (or skips up to
    ``train.skip_nonfinite.max_consecutive`` such steps in a row).
    """
    train_dataset = run_preflight(cfg, check_output=comm.is_main_process())
    model = build_model(cfg)
    logger.info(f"Model:\n{model}")
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    ema = None
    if OmegaConf.select(cfg, "train.ema.enabled", default=False):
        ema = ModelEMA(
            model,
            decay=OmegaConf.select(cfg, "train.ema.decay", default=0.9998),
            warmup=OmegaConf.select(cfg, "train.ema.warmup", default=2000),
        )
    # True, False or "auto" (which may time the model's own step: before DDP wraps it)
    amp = amp_from_config(cfg, next(model.parameters()).device, model)
    ddp_model = wrap_ddp(model, **cfg.train.ddp)
    clip_enabled = OmegaConf.select(cfg, "train.clip_grad.enabled", default=True)
    trainer = DETRTrainer(
        ddp_model,
        None,
        optimizer,
        clip_grad_max_norm=(
            OmegaConf.select(cfg, "train.clip_grad.max_norm", default=0.1) if clip_enabled else None
        ),
        amp=amp.enabled,
        amp_dtype=amp.dtype,
        ema=ema,
        max_consecutive_nonfinite=OmegaConf.select(
            cfg, "train.skip_nonfinite.max_consecutive", default=0
        ),
    )
    checkpointables = {"ema": ema} if ema is not None else {}
    checkpointer = SafeCheckpointer(model, cfg.train.output_dir, trainer=trainer, **checkpointables)
    results: OrderedDict = OrderedDict()

    def evaluate() -> OrderedDict:
        results.clear()
        results.update(do_test(cfg, ema.module if ema is not None else model))
        return results

    trainer.register_hooks(
        [
            # first: seeds the step's randomness before any other hook's before_step
            IterationSeedHook(),
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            (
                hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
                if comm.is_main_process()
                else None
            ),
            hooks.EvalHook(cfg.train.eval_period, evaluate),
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if comm.is_main_process()
                else None
            ),
            # after evaluation: its memory is returned with the next purge
            AllocatorPurgeHook(),
            # last: after the writers read the step's scalars
            BoundedHistoryHook(),
        ]
    )
    seed = OmegaConf.select(cfg, "train.seed", default=-1)
    # One run seed for all processes; a resumed run takes the one of its checkpoint.
    trainer.seed = seed if seed is not None and seed >= 0 else comm.shared_random_seed()
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    if ema is not None and ema.updates == 0:
        # The average was copied from the model before the initial checkpoint (or a resumed
        # checkpoint without EMA) was loaded: start it from the loaded weights instead.
        ema.copy_from(model)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.data_loader = build_resumable_train_loader(
        cfg.dataloader.train, start_iter=start_iter, seed=trainer.seed, dataset=train_dataset
    )
    try:
        trainer.train(start_iter, cfg.train.max_iter)
    except NonFiniteLossError as error:
        if not comm.is_main_process():
            raise
        raise NonFiniteLossError(f"{error}. {_resume_advice(checkpointer)}", error.iteration)
    return results


def _resume_advice(checkpointer: SafeCheckpointer) -> str:
    """Which checkpoint a run stopped by a non-finite loss resumes from (checked to load)."""
    path = find_intact_checkpoint(checkpointer)
    if path is None:
        return f"No intact checkpoint in {checkpointer.save_dir}: a new run starts from scratch"
    last = checkpointer.get_checkpoint_file() if checkpointer.has_checkpoint() else None
    if path == last:
        return f"The last checkpoint {path} is intact: --resume continues from it"
    return (
        f"The newest intact checkpoint is {path}: write its file name into "
        f"{checkpointer.save_dir}/last_checkpoint, then --resume continues from it"
    )


def load_for_eval(cfg, model: torch.nn.Module, checkpoint: Optional[str] = None) -> None:
    """Load ``checkpoint`` (default ``cfg.train.init_checkpoint``); EMA weights when saved."""
    path = checkpoint or cfg.train.init_checkpoint
    if not path:
        logger.warning("No checkpoint to evaluate (train.init_checkpoint is empty)")
    extra = SafeCheckpointer(model).load(path)
    if OmegaConf.select(cfg, "train.ema.enabled", default=False) and "ema" in extra:
        model.load_state_dict(extra["ema"]["model"])
        logger.info(f"Loaded the EMA weights of {path}")
