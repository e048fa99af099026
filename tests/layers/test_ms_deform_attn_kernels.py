"""The compiled CPU / CUDA kernels against the grid_sample reference."""

import pytest
import torch

from focus_detr.layers import (
    multi_scale_deformable_attention,
    multi_scale_deformable_attention_reference,
)
from focus_detr.layers.ms_deform_attn_op import FORWARD_OP, compiled_kernel_available
from focus_detr.layers.ms_deform_attn_reference import (
    multi_scale_deformable_attention_reference_backward,
)

requires_cuda_kernel = pytest.mark.skipif(
    not torch.cuda.is_available() or not compiled_kernel_available("cuda"),
    reason="needs a GPU and focus_detr._C built with CUDA",
)


def _grads(function, inputs, grad_output):
    value, shapes, starts, locations, weights = inputs
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, locations, weights)]
    output = function(leaves[0], shapes, starts, leaves[1], leaves[2])
    return output, torch.autograd.grad(output, leaves, grad_output)


def _compare(inputs, *, rtol, atol):
    value = inputs[0]
    grad_output = torch.randn(
        value.shape[0], inputs[3].shape[1], value.shape[2] * value.shape[3], dtype=value.dtype
    ).to(value.device)
    expected, expected_grads = _grads(
        multi_scale_deformable_attention_reference, inputs, grad_output
    )
    actual, actual_grads = _grads(FORWARD_OP, inputs, grad_output)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    for name, a, e in zip(("value", "locations", "weights"), actual_grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=f"grad of {name}")


@pytest.mark.parametrize("head_dim", [30, 32, 64, 71])
def test_cpu_matches_reference_float64(compiled_cpu, msda_inputs, head_dim):
    _compare(msda_inputs(head_dim=head_dim, num_heads=3, batch=2), rtol=0, atol=1e-10)


@pytest.mark.parametrize("head_dim", [30, 32, 64, 71])
def test_cpu_matches_reference_float32(compiled_cpu, msda_inputs, head_dim):
    inputs = msda_inputs(head_dim=head_dim, dtype=torch.float32, num_queries=20)
    _compare(inputs, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("batch,num_heads,threads", [(1, 1, 4), (1, 3, 2), (2, 3, 4)])
def test_cpu_backward_with_split_queries(compiled_cpu, msda_inputs, batch, num_heads, threads):
    # With few (batch, head) pairs per thread, the queries are split over private buffers.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = msda_inputs(batch=batch, num_heads=num_heads, num_queries=11)
        _compare(inputs, rtol=0, atol=1e-10)
    finally:
        torch.set_num_threads(previous)


def test_cpu_gradcheck(compiled_cpu, msda_inputs):
    value, shapes, starts, locations, weights = msda_inputs(
        batch=2, num_queries=3, num_heads=2, head_dim=3, levels=((3, 4), (2, 3)), num_points=2
    )
    value, locations, weights = (t.requires_grad_(True) for t in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: multi_scale_deformable_attention(v, shapes, starts, loc, w),
        (value, locations, weights),
    )


def test_samples_outside_give_zeros(compiled_cpu, msda_inputs):
    value, shapes, starts, locations, weights = msda_inputs()
    locations = torch.where(locations[..., :1] < 0.5, locations - 2.0, locations + 2.0)
    grad_output = torch.randn(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3])
    output, grads = _grads(FORWARD_OP, (value, shapes, starts, locations, weights), grad_output)
    assert output.abs().max() == 0
    assert all(g.abs().max() == 0 for g in grads)


def test_fallback_backward_matches_autograd_of_reference(msda_inputs):
    inputs = msda_inputs(head_dim=7)
    value, shapes, starts, locations, weights = inputs
    grad_output = torch.randn(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3])
    _, expected = _grads(multi_scale_deformable_attention_reference, inputs, grad_output)
    actual = multi_scale_deformable_attention_reference_backward(*inputs, grad_output.double())
    for name, a, e in zip(("value", "locations", "weights"), actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12, msg=f"grad of {name}")


@requires_cuda_kernel
@pytest.mark.parametrize("head_dim", [30, 32, 64, 71, 1025])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_reference(msda_inputs, head_dim, dtype):
    inputs = msda_inputs(head_dim=head_dim, dtype=dtype, device="cuda", num_queries=17)
    tolerance = dict(rtol=0, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-3)
    _compare(inputs, **tolerance)


@requires_cuda_kernel
@pytest.mark.parametrize("head_dim", [3, 33])
def test_cuda_gradcheck(msda_inputs, head_dim):
    value, shapes, starts, locations, weights = msda_inputs(
        batch=2,
        num_queries=3,
        num_heads=2,
        head_dim=head_dim,
        levels=((3, 4), (2, 3)),
        num_points=2,
        device="cuda",
    )
    value, locations, weights = (t.requires_grad_(True) for t in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: multi_scale_deformable_attention(v, shapes, starts, loc, w),
        (value, locations, weights),
        nondet_tol=1e-12,  # atomicAdd of grad_value
    )
