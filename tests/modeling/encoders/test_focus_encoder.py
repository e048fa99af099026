import dataclasses

import helpers
import pytest
import torch
from torch import nn

from focus_detr.modeling.encoders.focus import FocusEncoder
from focus_detr.modeling.encoders.focus_layer import FocusEncoderLayer
from focus_detr.modeling.encoders.foreground_targets import foreground_loss
from focus_detr.modeling.encoders.token_selection import compute_token_budgets, fine_grained_scores
from focus_detr.modeling.structures import EncoderOutput

C = 32
FACTORS = (1.0, 0.8, 0.6, 0.6, 0.4, 0.2)
SHAPES = [(8, 8), (4, 4)]  # N = 80, strides 8 and 16: a 64 x 64 padded input
# image 0 fills the grid (80 valid tokens); image 1 (32 x 40) keeps 4 x 5 and 2 x 3 cells (26)
IMAGE_SIZES = [(64, 64), (32, 40)]


def make_features(shapes=SHAPES, image_sizes=IMAGE_SIZES, seed=0):
    return helpers.make_features(
        shapes, batch=len(image_sizes), channels=C, image_sizes=image_sizes, seed=seed
    )


def select_images(features, images):
    """The features of some images of a batch (the level geometry is shared)."""
    batched = ("tokens", "pos", "padding_mask", "valid_ratios", "proposals", "proposal_valid")
    return dataclasses.replace(
        features,
        valid_token_counts=features.valid_token_counts[images],
        **{name: getattr(features, name)[images] for name in batched},
    )


def make_encoder(num_levels=2, **kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("num_layers", len(kwargs.get("layer_keep_factors", FACTORS)))
    encoder = FocusEncoder(
        embed_dim=C, num_heads=4, num_levels=num_levels, num_points=2, ffn_dim=64, **kwargs
    )
    heads = dict(
        memory_projection=nn.Sequential(nn.Linear(C, C), nn.LayerNorm(C)),
        class_head=nn.Linear(C, 5),
    )
    return encoder, heads


def index_sets(output, image):
    return [set(indices[image].tolist()) for indices in output.layer_indices]


def test_budgets_exact():
    sizes, budgets = compute_token_budgets((80, 26), 0.5, FACTORS)
    # n = (41, 14), K = 41
    assert sizes == [41, 32, 24, 24, 16, 8]
    assert budgets == [[41, 14], [32, 11], [24, 8], [24, 8], [16, 5], [8, 2]]
    # the reference's rule: image i writes min(k_l, n_i) of the k_l = int(c_l * K) gathered
    sizes, budgets = compute_token_budgets((80, 26), 0.5, FACTORS, rule="batch")
    assert sizes == [41, 32, 24, 24, 16, 8]
    assert budgets == [[41, 14], [32, 14], [24, 14], [24, 14], [16, 14], [8, 8]]
    # the two rules agree on one image, and on the image with the largest budget
    for count in (1, 2, 7, 26, 80, 1001):
        assert compute_token_budgets([count], 0.5, FACTORS) == compute_token_budgets(
            [count], 0.5, FACTORS, rule="batch"
        )
    with pytest.raises(ValueError, match="'prefix'"):
        compute_token_budgets((80, 26), 0.5, FACTORS, rule="prefix")
    # rho = 1: n_i is clamped to the valid count; an empty image writes nothing
    sizes, budgets = compute_token_budgets([3, 0], 1.0, (1.0, 0.2))
    assert sizes == [3, 1] and budgets == [[3, 0], [1, 0]]
    # no image: one token gathered per layer, nothing written
    assert compute_token_budgets([], 0.5, (1.0, 0.5)) == ([1, 1], [[], []])


@pytest.mark.parametrize(
    "padded_batches, small_image_writes",
    [("reference", [14, 14, 14, 14, 14, 8]), ("per_image", [14, 11, 8, 8, 5, 2])],
)
def test_cascade_budgets_and_writes_on_two_images(padded_batches, small_image_writes):
    encoder, heads = make_encoder(padded_batches=padded_batches)
    features = make_features()
    output = encoder(features, heads)
    assert isinstance(output, EncoderOutput)
    assert output.memory.shape == (2, 80, C) and output.token_scores.shape == (2, 80)
    assert [i.shape for i in output.layer_indices] == [(2, k) for k in (41, 32, 24, 24, 16, 8)]
    assert all(i.dtype == torch.int64 for i in output.layer_indices)
    written = torch.stack([valid.sum(1) for valid in output.layer_valid], 1)
    assert written.tolist() == [[41, 32, 24, 24, 16, 8], small_image_writes]
    # each image writes the prefix of its indices, never a padded token
    for indices, valid, budget in zip(output.layer_indices, output.layer_valid, written.T):
        positions = torch.arange(indices.shape[1])[None]
        assert torch.equal(valid, positions < budget[:, None])
        assert not features.padding_mask.gather(1, indices)[valid].any()
    assert output.tokens_updated(features.padding_mask).tolist() == written.T.tolist()
    # exactly the first-layer prefixes change; padded and unselected tokens keep their input
    changed = (output.memory != features.tokens).any(-1)
    for image, count in enumerate((41, 14)):
        expected = set(output.layer_indices[0][image, :count].tolist())
        assert set(changed[image].nonzero().flatten().tolist()) == expected
    assert not changed[features.padding_mask].any()
    assert torch.equal(output.updated_mask(0, features.padding_mask), changed)


def test_index_sets_are_nested_and_follow_the_foreground_ranking():
    encoder, heads = make_encoder(padded_batches="per_image")
    features = make_features()
    output = encoder(features, heads)
    first = output.layer_indices[0]
    for indices in output.layer_indices:
        assert torch.equal(indices, first[:, : indices.shape[1]])
    logits = output.token_scores.detach()
    for image, count in enumerate((41, 14)):
        valid_logits = logits[image].masked_fill(features.padding_mask[image], float("-inf"))
        best = set(valid_logits.topk(count).indices.tolist())
        assert set(first[image, :count].tolist()) == best
    # padding holds the smallest valid logit, valid entries are the selector's logits
    padding = features.padding_mask
    assert torch.equal(logits[padding], torch.full_like(logits[padding], logits[~padding].min()))


def test_image_encoded_the_same_alone_or_in_a_batch():
    """The "per_image" option; the reference's encoding of the small image depends on its batch."""
    features = make_features()
    valid = ~features.padding_mask[1]
    for padded_batches in ("per_image", "reference"):
        encoder, heads = make_encoder(
            topk_sa=5, selector_input_mask="padding", padded_batches=padded_batches
        )
        batched = encoder(features, heads)
        alone = encoder(select_images(features, slice(1, 2)), heads)
        writes_alone = [v.sum().item() for v in alone.layer_valid]
        writes_batched = [v[1].sum().item() for v in batched.layer_valid]
        if padded_batches == "per_image":
            torch.testing.assert_close(alone.memory[0][valid], batched.memory[1][valid])
            assert writes_alone == writes_batched
        else:
            assert not torch.allclose(alone.memory[0][valid], batched.memory[1][valid])
            assert writes_alone == [14, 11, 8, 8, 5, 2] and writes_batched == [14] * 5 + [8]


def test_topk_sa_is_clamped_on_a_tiny_image():
    encoder, heads = make_encoder(topk_sa=300)
    seen = []
    for layer in encoder.layers:
        layer.self_attn.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    features = make_features([(2, 3), (1, 2)], [(16, 24)])  # 8 tokens
    output = encoder(features, heads)
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
    assert torch.isfinite(encoder(make_features(), heads).memory).all()


@pytest.mark.parametrize("project, calls", [(True, 3), (False, 1)])
def test_category_head_input_projection(project, calls):
    encoder, heads = make_encoder(layer_keep_factors=(1.0, 0.5), project_category_input=project)
    count = []
    heads["memory_projection"].register_forward_hook(lambda *args: count.append(1))
    encoder(make_features(), heads)
    assert len(count) == calls  # the selector input, then once per layer if projected


def test_gradients():
    encoder, heads = make_encoder(layer_keep_factors=(1.0, 0.5))
    features = make_features()
    features.tokens.requires_grad_(True)
    output = encoder(features, heads)
    output.memory.square().sum().backward(retain_graph=True)
    assert features.tokens.grad.abs().sum() > 0
    for name, parameter in encoder.layers.named_parameters():
        assert parameter.grad is not None, name
    # selection carries no gradient: the selector and the category head are untouched
    assert all(p.grad is None for p in encoder.selector.parameters())
    assert all(p.grad is None for p in heads["class_head"].parameters())
    targets = (torch.rand(2, 80) > 0.8).float()
    foreground_loss(output.token_scores, targets, features.padding_mask).backward()
    for name, parameter in encoder.selector.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert heads["memory_projection"][0].weight.grad is not None


@pytest.mark.parametrize("num_levels", [1, 3, 4, 5])
def test_shapes_for_any_number_of_levels(num_levels):
    shapes = [(9, 7), (5, 4), (3, 2), (2, 1), (1, 1)][:num_levels]
    encoder, heads = make_encoder(num_levels=num_levels, layer_keep_factors=(1.0, 0.5))
    features = make_features(shapes, [(72, 56), (60, 41)])
    output = encoder(features, heads)
    num_tokens = sum(h * w for h, w in shapes)
    assert output.memory.shape == (2, num_tokens, C)
    assert output.token_scores.shape == (2, num_tokens)
    assert torch.isfinite(output.memory).all()


def test_value_source_updated():
    features = make_features()
    outputs = []
    for source in ("initial", "updated"):
        encoder, heads = make_encoder(layer_keep_factors=(1.0, 1.0), value_source=source)
        outputs.append(encoder(features, heads).memory)
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
        ({"selector_input_mask": "none"}, "'none'"),
        ({"foreground_ranges": [(-1, 64)]}, "one size range per level"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FocusEncoder(embed_dim=C, num_heads=4, num_layers=6, **kwargs)


def test_keep_ratio_can_change_after_construction():
    encoder, heads = make_encoder()
    features = make_features()
    full = encoder(features, heads)
    encoder.keep_ratio = 0.25
    fewer = encoder(features, heads)
    assert (
        fewer.tokens_updated(features.padding_mask).sum()
        < full.tokens_updated(features.padding_mask).sum()
    )
    for bad in (0.0, 1.01, -0.5, "0.5", True):
        with pytest.raises(ValueError, match="keep_ratio"):
            encoder.keep_ratio = bad
    assert encoder.keep_ratio == 0.25


def test_selector_input_zeroes_the_invalid_proposal_ring():
    """
    Hand-worked on a 2-level grid without padding: level 0 is 2 x 60 cells, so the first and
    last column have proposal centres 0.5 / 60 < 0.01 and 59.5 / 60 > 0.99 (invalid); level 1
    (1 x 30) is inside (0.01, 0.99). With the reference behaviour ("proposals") exactly those
    four tokens enter the selector's projection as zeros; with "padding" none does.
    """
    features = make_features([(2, 60), (1, 30)], [(16, 480)])
    assert not features.padding_mask.any()
    ring = sorted((~features.proposal_valid[0]).nonzero().flatten().tolist())
    assert ring == [0, 59, 60, 119]
    for mask, expected_zero in (("proposals", ring), ("padding", [])):
        encoder, heads = make_encoder(layer_keep_factors=(1.0, 0.5), selector_input_mask=mask)
        seen = []
        heads["memory_projection"].register_forward_hook(lambda m, args, out: seen.append(args[0]))
        encoder(features, heads)
        zero_rows = (seen[0][0] == 0).all(-1).nonzero().flatten().tolist()
        assert zero_rows == expected_zero, mask


@pytest.mark.parametrize("padded_batches", ["reference", "per_image"])
def test_loss_is_the_weighted_foreground_loss(padded_batches):
    from focus_detr.modeling.encoders.base import EncoderLossInputs

    encoder, heads = make_encoder(layer_keep_factors=(1.0, 0.5), padded_batches=padded_batches)
    features = make_features()
    output = encoder(features, heads)
    boxes = [torch.tensor([[0.0, 0.0, 30.0, 30.0]]), torch.zeros(0, 4)]
    targets = [{"boxes_xyxy": b} for b in boxes]
    losses = encoder.losses(output, EncoderLossInputs(features, targets, criterion=None))
    raw = output.extras["foreground_logits"]
    reference = padded_batches == "reference"
    expected = 1.5 * foreground_loss(
        raw,
        encoder.foreground_loss.targets(boxes, features.level_shapes, features.strides),
        features.padding_mask,
        include_padding=reference,
    )
    assert list(losses) == ["loss_foreground"]
    torch.testing.assert_close(losses["loss_foreground"], expected)
    # the reference trains the raw logits of the padded tokens (as negatives), the option not
    raw.retain_grad()
    losses["loss_foreground"].backward()
    padded_grad = raw.grad[features.padding_mask]
    assert (padded_grad > 0).all() if reference else (padded_grad == 0).all()


class FixedLogits(nn.Module):
    """A stand-in for the selector: the given (B, N) logits whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, features, padding_mask, level_shapes):
        return self.logits.clone()


def test_padded_logits_fill_and_fine_grained_scores():
    """
    Image 1 keeps 26 of the 80 tokens. Its padded logits are the batch's smallest (-9, below
    the smallest valid -2): the reference fills padding with -9, the batch's raw minimum, and a
    gathered padded token enters the dual attention's ranking with max(class logit) * (-9); the
    option fills with the smallest valid logit and never lets a padded token be a candidate.
    """
    features = make_features()
    padding = features.padding_mask
    logits = torch.linspace(-2.0, 3.0, 160).view(2, 80).masked_fill(padding, -9.0)
    for padded_batches, fill in (("reference", -9.0), ("per_image", -2.0)):
        encoder, heads = make_encoder(padded_batches=padded_batches, topk_sa=64)
        encoder.selector = FixedLogits(logits)
        seen = []
        encoder.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args))
        output = encoder(features, heads)
        scores = output.token_scores.detach()
        assert (scores[padding] == fill).all() and torch.equal(scores[~padding], logits[~padding])
        assert torch.equal(output.extras["foreground_logits"], logits)
        query, indices = seen[0][0], output.layer_indices[0]
        fine, candidates = seen[0][7], seen[0][8]
        gathered_padding = padding.gather(1, indices)
        assert gathered_padding[1].sum() == 41 - 26  # layer 0 gathers k = 41 per image
        best_class = heads["class_head"](query).max(-1).values
        torch.testing.assert_close(fine[gathered_padding], best_class[gathered_padding] * fill)
        if padded_batches == "reference":
            assert candidates.all()
        else:
            assert torch.equal(candidates, output.layer_valid[0])
            assert not candidates[gathered_padding].any()


def test_reference_runs_a_top_k_per_layer():
    """
    The reference ranks the filled scores afresh in every layer: where padded tokens tie, the
    order torch.topk gives them depends on k, so a layer's padded picks need not be a prefix of
    the layer before's. Image 1 gathers 15 tied padded tokens in layer 0 and 6 in layer 1.
    """
    features = make_features()
    encoder, heads = make_encoder(padded_batches="reference")
    output = encoder(features, heads)
    scores = output.token_scores.detach()
    for indices in output.layer_indices:
        assert torch.equal(indices, scores.topk(indices.shape[1], dim=1).indices)
    # the written tokens (valid, untied) are prefixes of one ranking all the same
    first = output.layer_indices[0]
    for indices, valid in zip(output.layer_indices, output.layer_valid):
        assert torch.equal(indices[valid], first[:, : indices.shape[1]][valid])


def test_mismatched_inputs():
    encoder, heads = make_encoder(num_levels=3)
    with pytest.raises(ValueError, match="num_levels=3"):
        encoder(make_features(), heads)
