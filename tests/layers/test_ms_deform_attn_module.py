"""The module on top of the op: backends, torch.compile, torch.export, fvcore."""

import pytest
import torch

from focus_detr.layers import MultiScaleDeformableAttention, msda_backend
from focus_detr.layers.flop_count import MSDA_FLOP_HANDLES, ms_deform_attn_flop_count
from focus_detr.layers.ms_deform_attn_op import BACKWARD_OP, FORWARD_OP

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
