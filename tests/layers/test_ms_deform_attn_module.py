"""The module on top of the op: backends, torch.compile, torch.export, fvcore."""

import pytest
import torch

from focus_detr.layers import (
    MultiScaleDeformableAttention,
    msda_backend,
    multi_scale_deformable_attention,
)
from focus_detr.layers.flop_count import MSDA_FLOP_HANDLES, ms_deform_attn_flop_count
from focus_detr.layers.ms_deform_attn_op import (
    BACKWARD_OP,
    FORWARD_OP,
    compiled_kernel_available,
    extension_load_error,
)

LEVELS = ((6, 7), (3, 4))


def _tiny_problem(*, reference_dim: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    module = MultiScaleDeformableAttention(embed_dim=16, num_heads=2, num_levels=2, num_points=3)
    # non-zero attention logits and offsets, so that the samples move off the init ring
    torch.nn.init.normal_(module.attention_weights.weight, std=0.5)
    torch.nn.init.normal_(module.sampling_offsets.weight, std=0.5)
    spatial_shapes = torch.tensor(LEVELS)
    level_start_index = torch.tensor([0, 42])
    query = torch.randn(2, 5, 16)
    reference = torch.rand(2, 5, 2, reference_dim)
    value = torch.randn(2, 54, 16)
    padding = torch.zeros(2, 54, dtype=torch.bool)
    padding[1, -5:] = True
    return module, (query, reference, value, spatial_shapes, level_start_index, padding)


def _output_and_grads(module, inputs):
    module.zero_grad()
    query = inputs[0].detach().requires_grad_(True)
    output = module(query, *inputs[1:])
    output.pow(2).sum().backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    return output.detach(), query.grad, grads


@pytest.mark.skipif(
    not compiled_kernel_available("cpu"),
    reason="focus_detr._C is not loaded, so the op's fallback is the reference itself and the "
    f"comparison would be vacuous ({extension_load_error() or 'no CPU kernels'})",
)
@pytest.mark.parametrize("reference_dim", [2, 4])
def test_module_same_with_op_and_reference(reference_dim):
    module, inputs = _tiny_problem(reference_dim=reference_dim)
    output, query_grad, grads = _output_and_grads(module, inputs)
    with msda_backend("reference"):
        expected, expected_query_grad, expected_grads = _output_and_grads(module, inputs)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(query_grad, expected_query_grad, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("reference_dim", [2, 4])
def test_return_sampling(reference_dim):
    module, inputs = _tiny_problem(reference_dim=reference_dim)
    query, reference, value, shapes, starts, padding = inputs
    output, locations, weights = module(*inputs, return_sampling=True)
    torch.testing.assert_close(output, module(*inputs), rtol=0, atol=0)
    assert locations.shape == (2, 5, 2, 2, 3, 2) and weights.shape == (2, 5, 2, 2, 3)
    offsets = module.sampling_offsets(query).view(2, 5, 2, 2, 3, 2)
    logits = module.attention_weights(query).view(2, 5, 2, 6)
    expected_weights = (logits.exp() / logits.exp().sum(-1, keepdim=True)).view(2, 5, 2, 2, 3)
    torch.testing.assert_close(weights, expected_weights)
    expected = torch.empty(2, 5, 2, 2, 3, 2)
    for level, (height, width) in enumerate(LEVELS):
        for axis, cells in ((0, width), (1, height)):
            centre = reference[:, :, None, level, None, axis]
            if reference_dim == 2:  # offsets in cells of the level
                position = centre + offsets[:, :, :, level, :, axis] / cells
            else:  # offsets in units of half the box size / P, P = 3 points
                size = reference[:, :, None, level, None, 2 + axis]
                position = centre + offsets[:, :, :, level, :, axis] * size / (2 * 3)
            expected[:, :, :, level, :, axis] = position
    torch.testing.assert_close(locations, expected)
    # the output is the op applied to exactly these locations and weights
    projected = module.value_proj(value).masked_fill(padding[..., None], 0.0).view(2, 54, 2, 8)
    sampled = multi_scale_deformable_attention(projected, shapes, starts, locations, weights)
    torch.testing.assert_close(output, module.output_proj(sampled))


def _invalid_module_inputs():
    module, (query, reference, value, shapes, starts, padding) = _tiny_problem()
    return module, {
        "query": ((query[..., :8], reference, value, shapes, starts), "query must be (B, Nq, 16)"),
        "value": ((query, reference, value[:1], shapes, starts), "value must be (B, Nv, 16)"),
        "reference_points": (
            (query, reference[..., :1], value, shapes, starts),
            "reference_points must be (B, Nq, 2, 2) points",
        ),
        "levels": (
            (query, reference[:, :, :1], value, shapes, starts),
            "got (2, 5, 1, 2)",
        ),
        "spatial_shapes": (
            (query, reference, value, shapes[:1], starts),
            "spatial_shapes must have shape (2, 2), got (1, 2)",
        ),
        "padding": (
            (query, reference, value, shapes, starts, padding[:, :4]),
            "value_padding_mask must be (B, Nv) = (2, 54), got (2, 4)",
        ),
    }


@pytest.mark.parametrize(
    "case", ["query", "value", "reference_points", "levels", "spatial_shapes", "padding"]
)
def test_module_rejects_bad_shapes(case):
    module, cases = _invalid_module_inputs()
    arguments, message = cases[case]
    with pytest.raises(ValueError) as error:
        module(*arguments)
    assert message in str(error.value)


def test_module_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_points must be positive, got 0"):
        MultiScaleDeformableAttention(embed_dim=16, num_heads=2, num_points=0)
    with pytest.raises(ValueError, match="embed_dim=18, num_heads=4"):
        MultiScaleDeformableAttention(embed_dim=18, num_heads=4)


def test_module_under_autocast():
    module, inputs = _tiny_problem()
    expected = module(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = module(*inputs)
    assert output.dtype == torch.bfloat16  # output_proj runs in bfloat16
    torch.testing.assert_close(output.float(), expected, rtol=5e-2, atol=5e-2)
    output.float().sum().backward()
    assert all(p.grad is not None for p in module.parameters())


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    # dynamic=True: symbolic sizes go through the input checks and the fake implementation
    module, inputs = _tiny_problem()
    compiled = torch.compile(module, fullgraph=True, dynamic=True)
    for num_queries in (5, 7):
        problem = (torch.randn(2, num_queries, 16), torch.rand(2, num_queries, 2, 2), *inputs[2:])
        expected, expected_query_grad, expected_grads = _output_and_grads(module, problem)
        output, query_grad, grads = _output_and_grads(compiled, problem)
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(query_grad, expected_query_grad, rtol=1e-4, atol=1e-5)
        for name, grad in grads.items():
            name = name.replace("_orig_mod.", "")
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_opcheck(msda_inputs):
    # schema, fake (meta) implementations and autograd registration agree with the kernels
    value, shapes, starts, locations, weights = msda_inputs(head_dim=4, num_queries=3)
    grad_output = torch.randn(2, 3, 2 * 4, dtype=torch.float64)
    torch.library.opcheck(BACKWARD_OP, (value, shapes, starts, locations, weights, grad_output))
    for t in (value, locations, weights):
        t.requires_grad_(True)
    torch.library.opcheck(FORWARD_OP, (value, shapes, starts, locations, weights))


def test_torch_export_sees_one_op():
    module, inputs = _tiny_problem()
    exported = torch.export.export(module, inputs)
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    msda = [t for t in targets if "focus_detr" in str(t)]
    assert msda == [torch.ops.focus_detr.ms_deform_attn.default], targets
    assert not any("grid_sampler" in str(t) for t in targets)
    torch.testing.assert_close(exported.module()(*inputs), module(*inputs))


def test_fvcore_counts_the_op():
    fvcore_nn = pytest.importorskip("fvcore.nn")
    module, inputs = _tiny_problem()
    analysis = fvcore_nn.FlopCountAnalysis(module, inputs).set_op_handle(**MSDA_FLOP_HANDLES)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_operator = analysis.by_operator()
    expected = ms_deform_attn_flop_count(2, 5, 2, 2, 3, 8)
    assert expected == 2 * 5 * 2 * 2 * 3 * 8 * 5
    assert by_operator["ms_deform_attn"] == expected
    assert analysis.total() > expected  # plus the linear layers
