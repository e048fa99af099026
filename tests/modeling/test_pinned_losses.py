"""
Speed work keeps the numbers: three fixed-seed training steps of every tiny encoder model give
the losses recorded (in ``data/pinned_losses.json``) before the training step was optimized.
Regenerate the file only for a deliberate change of the model's behaviour.
"""

import json
from pathlib import Path

import pytest
import torch
from detectron2.config import instantiate
from helpers import make_batched_inputs, tiny_model_config

PINNED = json.loads((Path(__file__).parent / "data" / "pinned_losses.json").read_text())

pytestmark = pytest.mark.usefixtures("single_thread")


def losses_of_three_steps(encoder: str):
    """Per step the loss terms of a tiny model trained with AdamW on a fixed batch."""
    torch.manual_seed(0)
    model = instantiate(tiny_model_config(encoder=encoder)).train()
    inputs = make_batched_inputs()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps = []
    for step in range(3):
        torch.manual_seed(100 + step)  # the denoising noise of the step
        losses = model(inputs)
        steps.append({name: float(value) for name, value in sorted(losses.items())})
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    return steps


@pytest.mark.parametrize("encoder", sorted(PINNED))
def test_training_steps_give_the_pinned_losses(encoder):
    steps = losses_of_three_steps(encoder)
    for step, (got, expected) in enumerate(zip(steps, PINNED[encoder])):
        assert set(got) == set(expected), step
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-5), (step, name)
