# AdamW of DETR-style training: lr 1e-4, weight decay 1e-4 (none on norms), backbone lr x 0.1.
from functools import partial

import torch
from detectron2.config import LazyCall as L
from detectron2.solver.build import get_default_optimizer_params

from focus_detr.solver import lr_factor_by_prefix

AdamW = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(
        # params.model is set by train_net.py
        base_lr="${..lr}",
        weight_decay_norm=0.0,
        lr_factor_func=partial(lr_factor_by_prefix, prefixes="backbone.", factor=0.1),
    ),
    lr=1e-4,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
)
