"""Seconds per training step or per inference of a config's model, by precision and by module."""

import copy
import itertools
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import instantiate
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage
from omegaconf import OmegaConf

from focus_detr.engine import DETRTrainer, ModelEMA

from .report import TimedRun
from .timer import SectionTimer, profile_table, time_runs

__all__ = ["PRECISIONS", "build_model_on_device", "inference_inputs", "time_inference"]
__all__ += ["time_training"]

# name -> autocast dtype (None: float32, no autocast)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LABELS = {"fp32": "float32", "bf16": "bfloat16 autocast", "fp16": "float16 autocast"}
Profiles = List[Tuple[str, str]]


def build_model_on_device(cfg, *, seed: int = 0) -> torch.nn.Module:
    """``cfg.model`` (seeded) on ``cfg.train.device``, or on the CPU without CUDA."""
    seed_all_rng(seed)
    device = OmegaConf.select(cfg, "train.device", default="cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"
    return instantiate(cfg.model).to(device)


def _trainer(cfg, model, optimizer, key: str, data) -> DETRTrainer:
    """The trainer of training (gradient clipping, EMA) in precision ``key``."""
    clip = OmegaConf.select(cfg, "train.clip_grad.enabled", default=True)
    ema = None
    if OmegaConf.select(cfg, "train.ema.enabled", default=False):
        ema = ModelEMA(model, decay=cfg.train.ema.decay, warmup=cfg.train.ema.warmup)
    return DETRTrainer(
        model,
        data,
        optimizer,
        clip_grad_max_norm=cfg.train.clip_grad.max_norm if clip else None,
        amp=PRECISIONS[key] is not None,
        amp_dtype=PRECISIONS[key],
        ema=ema,
    )


def _timed(label, step, images, timer, *, warmup, iters, profiles) -> TimedRun:
    seconds = time_runs(step, warmup=warmup, iters=iters, device=timer.device, sections=timer)
    totals = timer.totals()
    timer.remove()
    if profiles is not None:
        profiles.append((label, profile_table(step)))
    return TimedRun(label, images, seconds, totals)


def time_training(
    cfg,
    *,
    precisions: Sequence[str],
    warmup: int,
    iters: int,
    with_loader: bool = False,
    profile: bool = False,
) -> Tuple[List[TimedRun], Dict[str, str], Profiles]:
    """
    Time ``DETRTrainer.run_step`` as training runs it (forward and loss sum under autocast,
    backward, gradient clipping, optimizer step, EMA) in every precision, from the same initial
    weights and optimizer state, on batches of the training loader fetched before timing (the
    live loader with ``with_loader``).

    Returns:
        the runs, notes on what was timed, and (label, ``torch.profiler`` table) with
        ``profile``.
    """
    model = build_model_on_device(cfg).train()
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    loader = instantiate(cfg.dataloader.train)
    batches = list(itertools.islice(loader, warmup + iters))
    model_state = copy.deepcopy(model.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    runs, timing = [], dict(warmup=warmup, iters=iters, profiles=[] if profile else None)
    for key in precisions:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        seed_all_rng(0)
        data = loader if with_loader else itertools.cycle(batches)
        trainer = _trainer(cfg, model, optimizer, key, data)
        timer = SectionTimer(model, optimizer=optimizer, trainer=trainer)
        with EventStorage(0) as storage:
            trainer.storage = storage

            def step() -> None:
                trainer.run_step()
                trainer.iter = storage.iter = trainer.iter + 1

            label = LABELS[key] + (", live loader" if with_loader else "")
            runs.append(_timed(label, step, len(batches[0]), timer, **timing))
    clip = cfg.train.clip_grad.max_norm if cfg.train.clip_grad.enabled else "off"
    source = "the live training loader" if with_loader else "fetched before timing"
    notes = {
        "device": str(next(model.parameters()).device),
        "data": f"batches of {len(batches[0])} images from the training loader, {source}",
        "step": f"DETRTrainer.run_step: forward + loss sum under autocast, backward, grad "
        f"clipping max_norm {clip}, {type(optimizer).__name__} step; no LR schedule",
        "timing": f"{warmup} warm-up + {iters} timed steps per precision, same batches and "
        "initial weights for each",
    }
    return runs, notes, timing["profiles"] or []


def inference_inputs(cfg, size: Optional[Tuple[int, int]] = None) -> Tuple[List[dict], str]:
    """One random uint8 image of ``size`` (H, W), else the first image of the test loader, and
    its description."""
    if size is None:
        inputs = next(iter(instantiate(cfg.dataloader.test)))[:1]
        height, width = inputs[0]["image"].shape[-2:]
        name = OmegaConf.select(cfg, "dataloader.test.dataset.names")
        return inputs, f"first image of {name} (test loader), {height}x{width} after resizing"
    height, width = size
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
    return [{"image": image, "height": height, "width": width}], f"random {height}x{width} image"


def time_inference(
    cfg,
    *,
    precisions: Sequence[str],
    size: Optional[Tuple[int, int]],
    weights: Optional[str],
    warmup: int,
    iters: int,
    profile: bool = False,
) -> Tuple[List[TimedRun], Dict[str, str], Profiles]:
    """Time the model's inference (eval, no_grad, batch 1) on :func:`inference_inputs` in every
    precision; returns as :func:`time_training`."""
    model = build_model_on_device(cfg).eval()
    if weights:
        DetectionCheckpointer(model).load(weights)
    inputs, described = inference_inputs(cfg, size)
    device_type = next(model.parameters()).device.type
    runs, timing = [], dict(warmup=warmup, iters=iters, profiles=[] if profile else None)
    for key in precisions:
        dtype = PRECISIONS[key]

        def forward() -> None:
            with (
                torch.no_grad(),
                torch.autocast(
                    device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None
                ),
            ):
                model(inputs)

        runs.append(_timed(LABELS[key], forward, 1, SectionTimer(model), **timing))
    notes = {
        "device": device_type,
        "input": f"{described}, batch 1, {f'weights {weights}' if weights else 'random weights'}",
        "timing": f"{warmup} warm-up + {iters} timed forwards per precision, eval, no_grad",
    }
    return runs, notes, timing["profiles"] or []
