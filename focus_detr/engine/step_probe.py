"""Time the model's own training step in float32 and bfloat16 autocast, leaving no trace."""

import contextlib
import copy
import time
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm
from omegaconf import OmegaConf
from torch import nn

from .precision import ProbeResult

__all__ = ["measure_model_step", "model_step_probe", "probe_batch", "training_image_size"]


def training_image_size(cfg, default: int = 512) -> int:
    """The longest image side the config's training mapper produces (``max_size`` of its last
    ``ResizeShortestEdge``), else ``default``."""
    size = None
    augmentations = (
        cfg.dataloader.train.mapper.get("augmentations", []) if "dataloader" in cfg else []
    )
    for augmentation in augmentations:
        target = augmentation.get("_target_", "")
        name = getattr(target, "__name__", str(target))
        if name.endswith("ResizeShortestEdge") and augmentation.get("max_size"):
            size = int(augmentation["max_size"])
    return size or default


def probe_batch(
    size: int, *, num_images: int = 2, num_classes: int = 1, seed: int = 0
) -> List[Dict]:
    """``num_images`` random ``size`` x ``size`` images with three boxes each, in the format of
    detectron2's dataset mapper (its own random generator: the global state is kept)."""
    generator = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(num_images):
        image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator)
        corners = torch.rand(3, 2, generator=generator) * size * 0.6
        boxes = torch.cat(
            [corners, corners + size * 0.1 + torch.rand(3, 2, generator=generator) * size * 0.3], 1
        )
        instances = Instances((size, size))
        instances.gt_boxes = Boxes(boxes.clamp(max=size))
        instances.gt_classes = torch.randint(0, num_classes, (3,), generator=generator)
        batch.append({"image": image, "instances": instances, "height": size, "width": size})
    return batch


@contextlib.contextmanager
def _state_kept(model: nn.Module) -> Iterator[None]:
    """Restore the model's buffers (BatchNorm statistics), gradients and the random state."""
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    grads = {name: p.grad for name, p in model.named_parameters()}
    rng = torch.get_rng_state()
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
        for name, parameter in model.named_parameters():
            parameter.grad = grads[name]
        torch.set_rng_state(rng)


def measure_model_step(
    model: nn.Module, batch: Sequence[Dict], *, runs: int = 2, device_type: str = "cpu"
) -> ProbeResult:
    """
    Fastest of ``runs`` forward + loss + backward passes of ``model`` on ``batch`` in float32
    and under bfloat16 autocast (after one warm-up pass of each, interleaved), with the
    process's thread count. The model's weights never change (no optimizer step) and its
    buffers, gradients and the random state are restored.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    batch = copy.deepcopy(list(batch))
    was_training = model.training
    model.train()

    def step(bfloat16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bfloat16):
            losses = sum(model(batch).values())
        losses.backward()
        for parameter in model.parameters():
            parameter.grad = None
        return time.perf_counter() - start

    best: Dict[bool, float] = {False: float("inf"), True: float("inf")}
    with _state_kept(model), torch.enable_grad():
        step(False)
        step(True)
        for _ in range(runs):
            for bfloat16 in (False, True):
                best[bfloat16] = min(best[bfloat16], step(bfloat16))
    model.train(was_training)
    size = tuple(batch[0]["image"].shape[-2:])
    description = (
        f"the model's training step (forward, loss, backward) on {len(batch)} images of "
        f"{size[0]}x{size[1]}, fastest of {runs} runs, {torch.get_num_threads()} threads"
    )
    return ProbeResult(best[False], best[True], False, description)


def model_step_probe(model: nn.Module, cfg, num_images: Optional[int] = None):
    """
    A zero-argument callable timing ``model``'s step on a batch like one process's training
    batch: ``num_images`` (default: the config's total batch size over the processes, at most 8)
    random images of the config's training size.
    """
    size = training_image_size(cfg)
    if num_images is None:
        total = OmegaConf.select(cfg, "dataloader.train.total_batch_size", default=2)
        num_images = max(1, min(8, int(total) // comm.get_world_size()))
    classes = int(getattr(model, "num_classes", 1))

    def probe() -> ProbeResult:
        return measure_model_step(
            model, probe_batch(size, num_images=num_images, num_classes=classes)
        )

    return probe
