import pytest
import torch
from torch import nn

from focus_detr.modeling.encoder_layer import FocusEncoderLayer
from focus_detr.modeling.encoder_output import EncoderOutput
from focus_detr.modeling.focus_encoder import (
    FocusEncoder,
    compute_token_budgets,
    fine_grained_scores,
)
from focus_detr.modeling.foreground_targets import foreground_loss

C = 32
FACTORS = (1.0, 0.8, 0.6, 0.6, 0.4, 0.2)
SHAPES = [(8, 8), (4, 4)]  # N = 80
# image 0 fills the grid (80 valid tokens); image 1 is 4 x 5 and 2 x 3 (26 valid tokens)
VALID = [[(8, 8), (4, 4)], [(4, 5), (2, 3)]]


def make_inputs(shapes, valid_sizes, seed=0):
    """Flattened encoder inputs for images with per-level valid (h, w) sizes."""
    generator = torch.Generator().manual_seed(seed)
    masks, references = [], []
    for level, (h, w) in enumerate(shapes):
        level_masks, level_refs = [], []
        for sizes in valid_sizes:
            vh, vw = sizes[level]
            mask = torch.ones(h, w, dtype=torch.bool)
            mask[:vh, :vw] = False
            level_masks.append(mask.flatten())
            ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
            # normalized by the valid size, then mapped to every level's padded grid
            point = torch.stack([xs.flatten() / vw, ys.flatten() / vh], -1)
            ratios = torch.tensor([[sz[1] / hw[1], sz[0] / hw[0]] for sz, hw in zip(sizes, shapes)])
            level_refs.append(point[:, None, :] * ratios[None])
        masks.append(torch.stack(level_masks))
        references.append(torch.stack(level_refs))
    spatial_shapes = torch.tensor(shapes)
    sizes = spatial_shapes.prod(1)
    batch, num_tokens = len(valid_sizes), int(sizes.sum())
    return dict(
        tokens=torch.randn(batch, num_tokens, C, generator=generator),
        token_pos=torch.randn(batch, num_tokens, C, generator=generator),
        padding_mask=torch.cat(masks, 1),
        spatial_shapes=spatial_shapes,
        level_start_index=torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]]),
        valid_ratios=torch.ones(batch, len(shapes), 2),
        reference_points=torch.cat(references, 1),
    )


def make_encoder(num_levels=2, **kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("num_layers", len(kwargs.get("layer_keep_factors", FACTORS)))
    encoder = FocusEncoder(
        embed_dim=C, num_heads=4, num_levels=num_levels, num_points=2, ffn_dim=64, **kwargs
    )
    heads = dict(
        token_projection=nn.Sequential(nn.Linear(C, C), nn.LayerNorm(C)),
        category_head=nn.Linear(C, 5),
    )
    return encoder, heads


def index_sets(output, image):
    return [set(indices[image].tolist()) for indices in output.layer_indices]


def test_budgets_exact():
    sizes, budgets = compute_token_budgets(torch.tensor([80, 26]), 0.5, FACTORS)
    # n = (41, 14), K = 41
    assert sizes == [41, 32, 24, 24, 16, 8]
    assert budgets.tolist() == [[41, 14], [32, 11], [24, 8], [24, 8], [16, 5], [8, 2]]
    # rho = 1: n_i is clamped to the valid count; an empty image writes nothing
    sizes, budgets = compute_token_budgets(torch.tensor([3, 0]), 1.0, (1.0, 0.2))
    assert sizes == [3, 1] and budgets.tolist() == [[3, 0], [1, 0]]


def test_cascade_budgets_and_writes_on_two_images():
    encoder, heads = make_encoder()
    inputs = make_inputs(SHAPES, VALID)
    output = encoder(**inputs, **heads)
    assert isinstance(output, EncoderOutput)
    assert output.memory.shape == (2, 80, C) and output.foreground_logits.shape == (2, 80)
    assert [i.shape for i in output.layer_indices] == [(2, k) for k in (41, 32, 24, 24, 16, 8)]
    assert all(i.dtype == torch.int64 for i in output.layer_indices)
    written = torch.stack([valid.sum(1) for valid in output.layer_valid], 1)
    assert written.tolist() == [[41, 32, 24, 24, 16, 8], [14, 11, 8, 8, 5, 2]]
    # each image writes the prefix of its indices, never a padded token
    for indices, valid, budget in zip(output.layer_indices, output.layer_valid, written.T):
        positions = torch.arange(indices.shape[1])[None]
        assert torch.equal(valid, positions < budget[:, None])
        assert not inputs["padding_mask"].gather(1, indices)[valid].any()
    # exactly the first-layer prefixes change; padded and unselected tokens keep their input
    changed = (output.memory != inputs["tokens"]).any(-1)
    for image, count in enumerate((41, 14)):
        expected = set(output.layer_indices[0][image, :count].tolist())
        assert set(changed[image].nonzero().flatten().tolist()) == expected
    assert not changed[inputs["padding_mask"]].any()


def test_index_sets_are_nested_and_follow_the_foreground_ranking():
    encoder, heads = make_encoder()
    inputs = make_inputs(SHAPES, VALID)
    output = encoder(**inputs, **heads)
    first = output.layer_indices[0]
    for indices in output.layer_indices:
        assert torch.equal(indices, first[:, : indices.shape[1]])
    logits = output.foreground_logits.detach()
    for image, count in enumerate((41, 14)):
        valid_logits = logits[image].masked_fill(inputs["padding_mask"][image], float("-inf"))
        best = set(valid_logits.topk(count).indices.tolist())
        assert set(first[image, :count].tolist()) == best
    # padding holds the smallest valid logit, valid entries are the selector's logits
    padding = inputs["padding_mask"]
    assert torch.equal(logits[padding], torch.full_like(logits[padding], logits[~padding].min()))


def test_image_encoded_the_same_alone_or_in_a_batch():
    encoder, heads = make_encoder(topk_sa=5)
    inputs = make_inputs(SHAPES, VALID)
    batched = encoder(**inputs, **heads)
    alone_inputs = {
        k: v[1:] if k not in ("spatial_shapes", "level_start_index") else v
        for k, v in inputs.items()
    }
    alone = encoder(**alone_inputs, **heads)
    valid = ~inputs["padding_mask"][1]
    torch.testing.assert_close(alone.memory[0][valid], batched.memory[1][valid])
    assert [v.sum().item() for v in alone.layer_valid] == [
        v[1].sum().item() for v in batched.layer_valid
    ]


def test_topk_sa_is_clamped_on_a_tiny_image():
    encoder, heads = make_encoder(topk_sa=300)
    seen = []
    for layer in encoder.layers:
        layer.self_attn.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    inputs = make_inputs([(2, 3), (1, 2)], [[(2, 3), (1, 2)]])  # 8 tokens
    output = encoder(**inputs, **heads)
    assert torch.isfinite(output.memory).all()
    assert seen == [k.shape[1] for k in output.layer_indices] == [5, 4, 3, 3, 2, 1]


def test_dual_attention_updates_only_the_top_valid_tokens():
    torch.manual_seed(0)
    layer = FocusEncoderLayer(embed_dim=C, num_heads=4, num_levels=2, num_points=2, topk_sa=2)
    query, pos = torch.randn(1, 5, C), torch.randn(1, 5, C)
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.8, 0.3]])
    valid = torch.tensor([[True, True, True, False, True]])
    out = layer.dual_self_attention(query, pos, scores, valid)
    changed = (out != query).any(-1)[0]
    assert changed.tolist() == [False, True, True, False, False]  # 0.8 is beyond the budget
    # fewer valid tokens than topk_sa: only they attend; no valid token: nothing changes, no nan
    one_valid = torch.tensor([[False, True, False, False, False]])
    out = layer.dual_self_attention(query, pos, scores, one_valid)
    assert (out != query).any(-1)[0].tolist() == [False, True, False, False, False]
    none_valid = torch.zeros(1, 5, dtype=torch.bool)
    assert torch.equal(layer.dual_self_attention(query, pos, scores, none_valid), query)


def test_score_products():
    class_logits = torch.tensor([[[-3.0, -4.0], [2.0, 1.0]]])
    fts = torch.tensor([[-3.0, 2.0]])
    # the reference's logit product ranks two negatives (9) above two positives (4)
    assert fine_grained_scores(class_logits, fts, "logit").tolist() == [[9.0, 4.0]]
    probability = fine_grained_scores(class_logits, fts, "probability")
    torch.testing.assert_close(
        probability, torch.tensor([[0.0474, 0.8808]]).pow(2), atol=1e-4, rtol=0
    )
    with pytest.raises(ValueError, match="'sum'"):
        fine_grained_scores(class_logits, fts, "sum")
    encoder, heads = make_encoder(score_product="logit", layer_keep_factors=(1.0, 0.5))
    assert torch.isfinite(encoder(**make_inputs(SHAPES, VALID), **heads).memory).all()


@pytest.mark.parametrize("project, calls", [(True, 3), (False, 1)])
def test_category_head_input_projection(project, calls):
    encoder, heads = make_encoder(layer_keep_factors=(1.0, 0.5), project_category_input=project)
    count = []
    heads["token_projection"].register_forward_hook(lambda *args: count.append(1))
    encoder(**make_inputs(SHAPES, VALID), **heads)
    assert len(count) == calls  # the selector input, then once per layer if projected


def test_gradients():
    encoder, heads = make_encoder(layer_keep_factors=(1.0, 0.5))
    inputs = make_inputs(SHAPES, VALID)
    inputs["tokens"].requires_grad_(True)
    output = encoder(**inputs, **heads)
    output.memory.square().sum().backward(retain_graph=True)
    assert inputs["tokens"].grad.abs().sum() > 0
    for name, parameter in encoder.layers.named_parameters():
        assert parameter.grad is not None, name
    # selection carries no gradient: the selector and the category head are untouched
    assert all(p.grad is None for p in encoder.selector.parameters())
    assert all(p.grad is None for p in heads["category_head"].parameters())
    targets = (torch.rand(2, 80) > 0.8).float()
    foreground_loss(output.foreground_logits, targets, inputs["padding_mask"]).backward()
    for name, parameter in encoder.selector.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert heads["token_projection"][0].weight.grad is not None


@pytest.mark.parametrize("num_levels", [1, 3, 4, 5])
def test_shapes_for_any_number_of_levels(num_levels):
    shapes = [(9, 7), (5, 4), (3, 2), (2, 1), (1, 1)][:num_levels]
    valid = [shapes, [(max(1, h - 1), max(1, w - 1)) for h, w in shapes]]
    encoder, heads = make_encoder(num_levels=num_levels, layer_keep_factors=(1.0, 0.5))
    inputs = make_inputs(shapes, valid)
    output = encoder(**inputs, **heads)
    num_tokens = sum(h * w for h, w in shapes)
    assert output.memory.shape == (2, num_tokens, C)
    assert output.foreground_logits.shape == (2, num_tokens)
    assert torch.isfinite(output.memory).all()


def test_value_source_updated():
    inputs = make_inputs(SHAPES, VALID)
    outputs = []
    for source in ("initial", "updated"):
        encoder, heads = make_encoder(layer_keep_factors=(1.0, 1.0), value_source=source)
        outputs.append(encoder(**inputs, **heads).memory)
    assert not torch.allclose(outputs[0], outputs[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"keep_ratio": 0.0}, "0.0"),
        ({"keep_ratio": 1.5}, "1.5"),
        ({"layer_keep_factors": (1.0, 0.5)}, r"\(1.0, 0.5\)"),
        ({"layer_keep_factors": (1.0, 0.0, 1, 1, 1, 1)}, r"\(1.0, 0.0"),
        ({"topk_sa": 0}, "topk_sa.*0"),
        ({"score_product": "sum"}, "'sum'"),
        ({"value_source": "memory"}, "'memory'"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FocusEncoder(embed_dim=C, num_heads=4, num_layers=6, **kwargs)


def test_mismatched_inputs():
    encoder, heads = make_encoder()
    inputs = make_inputs(SHAPES, VALID)
    inputs["reference_points"] = inputs["reference_points"][:, :, :1]
    with pytest.raises(ValueError, match="reference_points"):
        encoder(**inputs, **heads)
