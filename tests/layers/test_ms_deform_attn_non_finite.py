"""NaN, infinite and huge sampling locations and attention weights: kernels == reference.

The rules (focus_detr/layers/ms_deform_attn_reference.py): a sample whose bilinear footprint
misses its level (non-finite and huge locations included) contributes zero whatever its weight;
a non-finite weight of a sample that touches its level counts as NaN.
"""

import math

import pytest
import torch

from focus_detr.layers import multi_scale_deformable_attention_reference
from focus_detr.layers.ms_deform_attn_op import FORWARD_OP, compiled_kernel_available
from focus_detr.layers.ms_deform_attn_reference import (
    multi_scale_deformable_attention_reference_backward,
    samples_touching_levels,
)

LOCATIONS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "1e30": 1e30, "-1e30": -1e30}
WEIGHTS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "1e30": 1e30}

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available() or not compiled_kernel_available("cuda"),
            reason="needs a GPU and focus_detr._C built with CUDA",
        ),
    ),
]


def _require_kernels(device: str) -> None:
    if not compiled_kernel_available(device):
        pytest.skip(f"focus_detr._C is not loaded or has no {device} kernels")


def _poison_locations(locations: torch.Tensor, number: float) -> torch.Tensor:
    """Sets x of every fourth sample, y of the next and both of the third; the rest are kept."""
    index = torch.arange(math.prod(locations.shape[:-1]), device=locations.device) % 4
    index = index.view(locations.shape[:-1])
    mask = torch.stack([(index == 0) | (index == 2), (index == 1) | (index == 2)], dim=-1)
    return locations.masked_fill(mask, number)


def _output_and_grads(function, inputs, grad_output):
    value, shapes, starts, locations, weights = inputs
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, locations, weights)]
    output = function(leaves[0], shapes, starts, leaves[1], leaves[2])
    return (output, *torch.autograd.grad(output, leaves, grad_output))


def _grad_output(inputs):
    value, _, _, locations, _ = inputs
    generator = torch.Generator().manual_seed(1)
    shape = (value.shape[0], locations.shape[1], value.shape[2] * value.shape[3])
    return torch.randn(shape, generator=generator, dtype=value.dtype).to(value.device)


def _tolerance(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)


def _assert_same(actual, expected, *, dtype):
    names = ("output", "grad_value", "grad_locations", "grad_weights")
    for name, a, e in zip(names, actual, expected):
        torch.testing.assert_close(a, e, equal_nan=True, msg=name, **_tolerance(dtype))


def _reference_results(inputs, grad_output):
    """Forward and autograd of the reference, after checking its backward op agrees."""
    expected = _output_and_grads(multi_scale_deformable_attention_reference, inputs, grad_output)
    fallback = multi_scale_deformable_attention_reference_backward(*inputs, grad_output)
    for name, a, e in zip(("value", "locations", "weights"), fallback, expected[1:]):
        tolerance = _tolerance(inputs[0].dtype)
        torch.testing.assert_close(a, e, equal_nan=True, msg=name, **tolerance)
    return expected


@pytest.mark.parametrize("name", sorted(LOCATIONS))
def test_reference_ignores_samples_at_non_finite_locations(msda_inputs, name):
    value, shapes, starts, locations, weights = msda_inputs(margin=0.0)
    poisoned = _poison_locations(locations, LOCATIONS[name])
    ignored = ~samples_touching_levels(poisoned, shapes)
    assert torch.equal(ignored, (poisoned != locations).any(-1))  # all locations were inside
    inputs = (value, shapes, starts, poisoned, weights)
    grad_output = _grad_output(inputs)
    output, grad_value, grad_locations, grad_weights = _reference_results(inputs, grad_output)
    # the same as the samples removed (zero weight, any location inside)
    removed = (value, shapes, starts, locations, weights.masked_fill(ignored, 0.0))
    expected = _output_and_grads(multi_scale_deformable_attention_reference, removed, grad_output)
    torch.testing.assert_close(output, expected[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_value, expected[1], rtol=0, atol=1e-12)
    assert grad_locations[ignored].abs().max() == 0 and grad_weights[ignored].abs().max() == 0
    assert grad_locations.isfinite().all() and grad_weights.isfinite().all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(LOCATIONS))
def test_kernel_non_finite_locations(msda_inputs, device, dtype, name):
    _require_kernels(device)
    value, shapes, starts, locations, weights = msda_inputs(dtype=dtype, device=device)
    inputs = (value, shapes, starts, _poison_locations(locations, LOCATIONS[name]), weights)
    grad_output = _grad_output(inputs)
    actual = _output_and_grads(FORWARD_OP, inputs, grad_output)
    assert all(t.isfinite().all() for t in actual), "NaN or inf leaked from a location"
    _assert_same(actual, _reference_results(inputs, grad_output), dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_locations_beyond_index_range(msda_inputs, device, dtype):
    # loc * size exceeds int64 (and overflows to inf for float32): no index may be computed
    _require_kernels(device)
    value, shapes, starts, locations, weights = msda_inputs(dtype=dtype, device=device)
    huge = torch.finfo(dtype).max / 2
    for number in (huge, -huge, 2.0**70, -(2.0**70)):
        inputs = (value, shapes, starts, _poison_locations(locations, number), weights)
        grad_output = _grad_output(inputs)
        actual = _output_and_grads(FORWARD_OP, inputs, grad_output)
        assert all(t.isfinite().all() for t in actual), number
        _assert_same(actual, _reference_results(inputs, grad_output), dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_kernel_non_finite_weights(msda_inputs, device, dtype, name):
    _require_kernels(device)
    value, shapes, starts, locations, weights = msda_inputs(dtype=dtype, device=device)
    # a few weights of one query, some of whose samples are outside their level
    poisoned = weights.clone()
    poisoned[0, 1] = WEIGHTS[name]
    poisoned[1, 2, 1, 0, 0] = WEIGHTS[name]
    inputs = (value, shapes, starts, locations, poisoned)
    grad_output = _grad_output(inputs)
    actual = _output_and_grads(FORWARD_OP, inputs, grad_output)
    _assert_same(actual, _reference_results(inputs, grad_output), dtype=dtype)
    touching = samples_touching_levels(locations, shapes)
    output = actual[0].view(*weights.shape[:3], -1)
    if name == "1e30":
        assert all(t.isfinite().all() for t in actual)
    else:
        # NaN exactly in the rows (query, head) with a poisoned sample inside its level
        poisoned_rows = (touching & ~poisoned.isfinite()).flatten(3).any(-1)
        assert poisoned_rows.any()
        assert torch.equal(output.isnan().all(-1), poisoned_rows)
        assert output[~poisoned_rows].isfinite().all()
        assert actual[3].isfinite().all()  # the weights' own gradient does not depend on them


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_non_finite_weights_of_samples_outside_do_not_leak(msda_inputs, device, name):
    _require_kernels(device)
    value, shapes, starts, locations, weights = msda_inputs(device=device)
    outside = ~samples_touching_levels(locations, shapes)
    assert outside.any()
    inputs = (value, shapes, starts, locations, weights.masked_fill(outside, WEIGHTS[name]))
    grad_output = _grad_output(inputs)
    clean = (value, shapes, starts, locations, weights.masked_fill(outside, 0.0))
    expected = _output_and_grads(FORWARD_OP, clean, grad_output)
    for function in (FORWARD_OP, multi_scale_deformable_attention_reference):
        actual = _output_and_grads(function, inputs, grad_output)
        assert all(t.isfinite().all() for t in actual), function
        _assert_same(actual, expected, dtype=torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_and_reference_agree_on_the_level_borders(msda_inputs, device, dtype):
    # NaN weights make the border test visible: NaN where a sample touches its level, 0 if not.
    # (Only the output: at x = -1 or x = w grid_sample may round to the other side and leave
    # out a border cell of zero bilinear weight, which a NaN weight turns into a NaN gradient.)
    _require_kernels(device)
    # one sample per (query, head): a row of the output is NaN iff its sample touches
    value, shapes, starts, locations, weights = msda_inputs(
        dtype=dtype, levels=((7, 9),), num_points=1, num_queries=40
    )
    generator = torch.Generator().manual_seed(2)
    size = shapes.flip(-1).to(dtype)[:, None, :]  # (L, 1, 2): (w, h)
    low = torch.rand(locations.shape, generator=generator) < 0.5
    border = torch.where(low, -0.5 / size, (size + 0.5) / size)  # x = -1 or x = w
    nudge = torch.randint(-2, 3, locations.shape, generator=generator).to(dtype)
    border = border + nudge * torch.finfo(dtype).eps * border.abs()
    inputs = [value, shapes, starts, border, torch.full_like(weights, math.nan)]
    inputs = [t.to(device) for t in inputs]
    touching = samples_touching_levels(inputs[3], inputs[1]).flatten(3).any(-1)
    assert touching.any() and not touching.all()
    output = FORWARD_OP(*inputs).view(*touching.shape, -1)
    assert torch.equal(output.isnan().all(-1), touching)
    assert output[~touching].abs().max() == 0
    torch.testing.assert_close(
        output, multi_scale_deformable_attention_reference(*inputs).view_as(output), equal_nan=True
    )
