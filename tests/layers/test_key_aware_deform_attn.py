"""KeyAwareDeformableAttention against a naive loop over samples with the bilinear formula."""

import math

import pytest
import torch

from focus_detr.layers import KeyAwareDeformableAttention, msda_backend
from focus_detr.layers.key_aware_deform_attn import key_aware_deformable_attention

LEVELS = ((3, 4), (2, 3))
EMBED, HEADS, POINTS = 6, 2, 2
HEAD_DIM = EMBED // HEADS


def _bilinear(features, start, height, width, x, y):
    """Zero-padded bilinear sample of the level (h * w rows of ``features`` from ``start``) at
    the cell coordinates (x, y); cell (i, j) has its centre at (j, i)."""
    x0, y0 = math.floor(x.item()), math.floor(y.item())
    fx, fy = x - x0, y - y0
    total = features.new_zeros(features.shape[-1])
    for row, column, weight in (
        (y0, x0, (1 - fx) * (1 - fy)),
        (y0, x0 + 1, fx * (1 - fy)),
        (y0 + 1, x0, (1 - fx) * fy),
        (y0 + 1, x0 + 1, fx * fy),
    ):
        if 0 <= row < height and 0 <= column < width:
            total = total + weight * features[start + row * width + column]
    return total


def _naive(module, query, reference, value, padding):
    """Returns (output (B, Nq, C), weights (B, Nq, H, L, P)) computed sample by sample; the
    keys are the projected values (Lite DETR's proj_key=False)."""
    batch, num_queries, _ = query.shape
    keep = (~padding[..., None]).to(value.dtype)
    keys = values = module.value_proj(value) * keep
    queries = module.query_proj(query)
    offsets = module.sampling_offsets(query).view(batch, num_queries, HEADS, len(LEVELS), -1, 2)
    rows, all_weights = [], []
    for b in range(batch):
        for n in range(num_queries):
            heads = []
            for h in range(HEADS):
                channels = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
                logits, samples, start = [], [], 0
                for level, (height, width) in enumerate(LEVELS):
                    for p in range(POINTS):
                        dx, dy = offsets[b, n, h, level, p]
                        box = reference[b, n, level]
                        if box.numel() == 2:
                            loc_x, loc_y = box[0] + dx / width, box[1] + dy / height
                        else:
                            loc_x = box[0] + dx / POINTS * box[2] / 2
                            loc_y = box[1] + dy / POINTS * box[3] / 2
                        x, y = loc_x * width - 0.5, loc_y * height - 0.5
                        key = _bilinear(keys[b, :, channels], start, height, width, x, y)
                        samples.append(
                            _bilinear(values[b, :, channels], start, height, width, x, y)
                        )
                        logits.append((queries[b, n, channels] * key).sum() / math.sqrt(HEAD_DIM))
                    start += height * width
                weights = torch.softmax(torch.stack(logits), dim=0)
                all_weights.append(weights)
                heads.append(sum(w * s for w, s in zip(weights, samples)))
            rows.append(torch.cat(heads))
    output = module.output_proj(torch.stack(rows).view(batch, num_queries, EMBED))
    weights = torch.stack(all_weights).view(batch, num_queries, HEADS, len(LEVELS), POINTS)
    return output, weights


def _problem(reference_dim):
    torch.manual_seed(0)
    module = KeyAwareDeformableAttention(
        embed_dim=EMBED, num_heads=HEADS, num_levels=len(LEVELS), num_points=POINTS
    ).double()
    torch.nn.init.normal_(module.sampling_offsets.weight, std=0.5)
    num_values = sum(h * w for h, w in LEVELS)
    padding = torch.zeros(2, num_values, dtype=torch.bool)
    padding[1, -2:] = True
    reference = torch.rand(2, 3, len(LEVELS), reference_dim, dtype=torch.float64)
    inputs = (
        torch.randn(2, 3, EMBED, dtype=torch.float64, requires_grad=True),
        reference,
        torch.randn(2, num_values, EMBED, dtype=torch.float64, requires_grad=True),
        torch.tensor(LEVELS),
        torch.tensor([0, LEVELS[0][0] * LEVELS[0][1]]),
        padding,
    )
    return module, inputs


def _grads(module, output, inputs):
    module.zero_grad()
    leaves = [inputs[0], inputs[2], *module.parameters()]
    return torch.autograd.grad(output.pow(2).sum(), leaves)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("reference_dim", [2, 4])
def test_matches_naive_loops(reference_dim, backend):
    module, inputs = _problem(reference_dim)
    with msda_backend(backend):
        output, locations, weights = module(*inputs, return_sampling=True)
    expected, expected_weights = _naive(module, inputs[0], inputs[1], inputs[2], inputs[5])
    torch.testing.assert_close(output, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-10, atol=1e-10)
    assert locations.shape == (2, 3, HEADS, len(LEVELS), POINTS, 2)
    for name, grad, expected_grad in zip(
        ["query", "value", *(name for name, _ in module.named_parameters())],
        _grads(module, output, inputs),
        _grads(module, expected, inputs),
    ):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-10, msg=name)


def test_keys_come_from_the_value_projection():
    """Lite DETR's layer list: offsets, query, value and output projections, nothing else (no
    key projection, no attention-weight layer)."""
    module, _ = _problem(2)
    assert {name for name, _ in module.named_children()} == {
        "sampling_offsets",
        "query_proj",
        "value_proj",
        "output_proj",
    }
    assert sum(p.numel() for p in module.parameters()) == 3 * (EMBED * EMBED + EMBED) + (
        EMBED * HEADS * len(LEVELS) * POINTS * 2 + HEADS * len(LEVELS) * POINTS * 2
    )


def test_samples_outside_have_zero_keys_and_values():
    # all samples far outside: zero keys (logit 0, uniform weights) and zero values
    module, (query, _, value, shapes, starts, padding) = _problem(2)
    reference = torch.full((2, 3, len(LEVELS), 2), 5.0, dtype=torch.float64)
    output, _, weights = module(query, reference, value, shapes, starts, return_sampling=True)
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / (len(LEVELS) * POINTS)))
    bias = module.output_proj.bias.expand_as(output)
    torch.testing.assert_close(output, bias, rtol=0, atol=0)


def test_functional_form_checks_shapes():
    query = torch.randn(1, 2, HEADS, HEAD_DIM)
    key = torch.randn(1, 18, HEADS, HEAD_DIM)
    locations = torch.rand(1, 2, HEADS, len(LEVELS), POINTS, 2)
    shapes, starts = torch.tensor(LEVELS), torch.tensor([0, 12])
    with pytest.raises(ValueError, match=r"got key \(1, 18, 2, 3\) and value \(1, 18, 1, 3\)"):
        key_aware_deformable_attention(query, key, key[:, :, :1], shapes, starts, locations)
    with pytest.raises(ValueError, match="differ in D"):
        key_aware_deformable_attention(query[..., :2], key, key, shapes, starts, locations)
    output, weights = key_aware_deformable_attention(query, key, key, shapes, starts, locations)
    assert output.shape == (1, 2, HEADS * HEAD_DIM) and weights.shape == locations.shape[:-1]


def test_under_autocast():
    module, inputs = _problem(2)
    module = module.float()
    inputs = [t.detach().float() if t.is_floating_point() else t for t in inputs]
    expected = module(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = module(*inputs)
    assert output.dtype == torch.bfloat16  # output_proj runs in bfloat16
    torch.testing.assert_close(output.float(), expected, rtol=5e-2, atol=5e-2)
    output.float().sum().backward()
    assert all(p.grad is not None for p in module.parameters())
