"""
Speed work keeps the numbers: three fixed-seed training steps of every tiny encoder model give
the losses recorded in ``data/pinned_losses.json``. The batch of every model has no padded token;
"focus_padded" is the Focus model on a batch whose second image is padded on every level (the
reference's padded-batch behaviour, the COCO configs' default). The steps run in float64, so the
recorded values do not depend on the CPU's instruction set: measured on an AMD EPYC (Zen 4),
natively and under ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``, the largest relative
difference of any loss term of the dense, Focus, Lite and Sparse models over the 3 steps was
2.1e-15 (float32: 8.6e-5, and 1.2e-4 against values recorded on an Intel CPU), of the hybrid
model's 5.2e-14, of the padded Focus batch's 1.9e-16. The tolerance, 1e-10, is over three orders
of magnitude above that spread and far below any change of behaviour.

Regenerate the file only for a deliberate change of the model's behaviour:
``PYTHONPATH=tests python tests/modeling/test_pinned_losses.py``.
"""

import json
from pathlib import Path

import pytest
import torch
from detectron2.config import instantiate
from helpers import ODD_SIZES, make_batched_inputs, tiny_model_config

PINNED_FILE = Path(__file__).parent / "data" / "pinned_losses.json"
PINNED = json.loads(PINNED_FILE.read_text())
ENCODERS = ("dense", "focus", "hybrid", "lite", "sparse")
# 136 x 184 next to 200 x 250: padded tokens on every level of the second image
PADDED_SIZES = ((200, 250), (136, 184))
CASES = ENCODERS + ("focus_padded",)

pytestmark = pytest.mark.usefixtures("single_thread")


def losses_of_three_steps(case: str):
    """Per step the loss terms of a tiny float64 model trained with AdamW on a fixed batch."""
    encoder = case.removesuffix("_padded")
    torch.manual_seed(0)
    model = instantiate(tiny_model_config(encoder=encoder)).double().train()
    inputs = make_batched_inputs(PADDED_SIZES if case.endswith("_padded") else ODD_SIZES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps = []
    for step in range(3):
        torch.manual_seed(100 + step)  # the denoising noise of the step
        losses = model(inputs)
        steps.append({name: value.item() for name, value in sorted(losses.items())})
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    return steps


def test_every_encoder_is_pinned():
    assert sorted(PINNED) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_training_steps_give_the_pinned_losses(case):
    steps = losses_of_three_steps(case)
    assert len(steps) == len(PINNED[case]) == 3
    for step, (got, expected) in enumerate(zip(steps, PINNED[case])):
        assert set(got) == set(expected), step
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, rel=1e-10, abs=1e-12), (step, name)


if __name__ == "__main__":
    torch.set_num_threads(1)
    pinned = {case: losses_of_three_steps(case) for case in CASES}
    PINNED_FILE.write_text(json.dumps(pinned, indent=1, sort_keys=True) + "\n")
    print(f"wrote {PINNED_FILE}")
