"""multi_scale_deformable_attention: dtypes, autocast, validation, layouts, empty inputs."""

import pytest
import torch

from focus_detr.layers import (
    get_msda_backend,
    msda_backend,
    multi_scale_deformable_attention,
    multi_scale_deformable_attention_reference,
    set_msda_backend,
)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_returns_input_dtype(msda_inputs, dtype):
    value, shapes, starts, locations, weights = msda_inputs(dtype=torch.float32, head_dim=8)
    expected = multi_scale_deformable_attention(value, shapes, starts, locations, weights)
    low = [t.to(dtype).requires_grad_(True) for t in (value, locations, weights)]
    output = multi_scale_deformable_attention(low[0], shapes, starts, low[1], low[2])
    assert output.dtype == dtype
    torch.testing.assert_close(output.float(), expected, rtol=2e-2, atol=5e-2)
    output.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == dtype for t in low)


def test_autocast(msda_inputs):
    value, shapes, starts, locations, weights = msda_inputs(dtype=torch.float32, head_dim=8)
    expected = multi_scale_deformable_attention(value, shapes, starts, locations, weights)
    projection = torch.nn.Linear(8, 8)
    with torch.no_grad():
        projection.weight.copy_(torch.eye(8))
        projection.bias.zero_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        projected = projection(value)  # bfloat16 under autocast
        assert projected.dtype == torch.bfloat16
        output = multi_scale_deformable_attention(projected, shapes, starts, locations, weights)
    # bfloat16 value with float32 locations and weights: computed and returned in float32
    assert output.dtype == torch.float32
    torch.testing.assert_close(output, expected, rtol=2e-2, atol=5e-2)
    output.sum().backward()
    assert projection.weight.grad is not None


def test_non_contiguous_and_int32_inputs(msda_inputs):
    value, shapes, starts, locations, weights = msda_inputs()
    expected = multi_scale_deformable_attention(value, shapes, starts, locations, weights)
    # same contents, other memory layouts
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)
    locations_t = locations.flip(-1).contiguous().flip(-1)
    weights_t = weights.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (value_t.is_contiguous() or weights_t.is_contiguous())
    output = multi_scale_deformable_attention(
        value_t, shapes.int(), starts.int(), locations_t, weights_t
    )
    torch.testing.assert_close(output, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_empty_queries(msda_inputs, backend):
    value, shapes, starts, locations, weights = msda_inputs(num_queries=0, head_dim=4)
    value.requires_grad_(True)
    with msda_backend(backend):
        output = multi_scale_deformable_attention(value, shapes, starts, locations, weights)
    assert output.shape == (2, 0, 2 * 4)
    output.sum().backward()
    assert value.grad.shape == value.shape and value.grad.abs().max() == 0


def test_backend_selection(msda_inputs):
    inputs = msda_inputs()
    assert get_msda_backend() == "auto"
    with msda_backend("reference"):
        assert get_msda_backend() == "reference"
        output = multi_scale_deformable_attention(*inputs)
    assert get_msda_backend() == "auto"
    expected = multi_scale_deformable_attention_reference(*inputs)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="'fast'"):
        set_msda_backend("fast")


def _replace(inputs, **changes):
    names = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "weights")
    return [changes.get(name, tensor) for name, tensor in zip(names, inputs)]


# (what to change, expected pieces of the message)
INVALID = {
    "batch": (lambda v, s, i, loc, w: {"weights": w[:1]}, ["batch", "(2, 2, 1)"]),
    "heads": (lambda v, s, i, loc, w: {"value": v[:, :, :1]}, ["heads", "(1, 2, 2)"]),
    "levels": (lambda v, s, i, loc, w: {"weights": w[:, :, :, :3]}, ["levels", "(2, 6, 2, 3, 3)"]),
    "points": (lambda v, s, i, loc, w: {"weights": w[..., :2]}, ["points", "(2, 6, 2, 4, 2)"]),
    "last_dim": (
        lambda v, s, i, loc, w: {"sampling_locations": torch.cat([loc, loc[..., :1]], -1)},
        ["(B, Nq, H, L, P, 2)", "(2, 6, 2, 4, 3, 3)"],
    ),
    "shapes_rank": (lambda v, s, i, loc, w: {"spatial_shapes": s[:3]}, ["(4, 2)", "(3, 2)"]),
    "starts_rank": (lambda v, s, i, loc, w: {"level_start_index": i[:2]}, ["(4,)", "(2,)"]),
    "shapes_sum": (
        lambda v, s, i, loc, w: {"spatial_shapes": s + 1},
        ["[[8, 10], [5, 6], [3, 4], [2, 2]]", "= 126", "Nv = 90"],
    ),
    "starts_values": (
        lambda v, s, i, loc, w: {"level_start_index": i + 1},
        ["[1, 64, 84, 90]", "expected [0, 63, 83, 89]"],
    ),
    "float_shapes": (
        lambda v, s, i, loc, w: {"spatial_shapes": s.float()},
        ["spatial_shapes", "integer", "torch.float32"],
    ),
    "integer_value": (lambda v, s, i, loc, w: {"value": v.long()}, ["value", "torch.int64"]),
    "devices": (
        lambda v, s, i, loc, w: {"value": v.to("meta")},
        ["value on meta", "spatial_shapes on cpu"],
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_inputs_raise_value_error(msda_inputs, case):
    inputs = msda_inputs()
    change, pieces = INVALID[case]
    with pytest.raises(ValueError) as error:
        multi_scale_deformable_attention(*_replace(inputs, **change(*inputs)))
    for piece in pieces:
        assert piece in str(error.value), (piece, str(error.value))
