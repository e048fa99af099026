"""
The tiny model overfits one small batch: every loss term and the gradient path behind it must
work together (a detached or mis-weighted loss that unit tests miss fails here).
"""

import pytest
import torch
from detectron2.config import instantiate
from helpers import make_batched_inputs, tiny_model_config

pytestmark = pytest.mark.usefixtures("single_thread")

# Last over first value after 120 steps, measured for seeds 0-4 natively and under
# ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 on an AMD EPYC (Zen 4), 10 runs:
#   total 0.168-0.328, loss_bbox 0.015-0.175, loss_giou 0.026-0.336,
#   loss_foreground 0.193-0.424, loss_class 0.065-0.295.
# The bounds sit 1.65x to 2.6x above the worst run; a detached or unweighted term stays near 1.
BOUNDS = {
    "total": 0.6,
    "loss_bbox": 0.45,
    "loss_giou": 0.6,
    "loss_foreground": 0.7,
    "loss_class": 0.6,
}


@pytest.mark.slow
def test_loss_falls_by_a_large_factor_on_one_batch():
    torch.manual_seed(0)
    model = instantiate(tiny_model_config(encoder="focus")).train()
    boxes = [[[5, 10, 45, 60], [60, 20, 115, 90]], [[15, 15, 75, 75]]]
    inputs = make_batched_inputs(((96, 128), (96, 112)), boxes, original_scale=1.0)
    for per_image, classes in zip(inputs, ([0, 2], [1])):
        per_image["instances"].gt_classes = torch.tensor(classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    history = []
    for _ in range(120):
        torch.manual_seed(0)  # the same denoising noise every step: one fixed problem
        losses = model(inputs)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        history.append({name: float(value) for name, value in losses.items()})
    first, last = history[0], history[-1]
    ratios = {name: last[name] / first[name] for name in BOUNDS if name != "total"}
    ratios["total"] = sum(last.values()) / sum(first.values())
    for name, bound in BOUNDS.items():
        assert ratios[name] < bound, (name, ratios)
