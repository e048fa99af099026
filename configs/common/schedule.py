# Step schedules in iterations of a 16-image batch (7500 iterations = 1 COCO epoch).
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

ITERS_PER_EPOCH = 7500


def step_lr_multiplier(epochs: int, decay_epoch: int, iters_per_epoch: int = ITERS_PER_EPOCH):
    """lr x 1 until ``decay_epoch``, then x 0.1 until ``epochs``; no warm-up (as the reference)."""
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[1.0, 0.1],
            milestones=[decay_epoch * iters_per_epoch, epochs * iters_per_epoch],
        ),
        warmup_length=0.0,
        warmup_method="linear",
        warmup_factor=0.001,
    )


lr_multiplier_12ep = step_lr_multiplier(12, 11)
lr_multiplier_24ep = step_lr_multiplier(24, 20)
lr_multiplier_36ep = step_lr_multiplier(36, 30)
