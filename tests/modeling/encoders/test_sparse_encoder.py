"""Sparse DETR: the decoder-attention target by hand, the kept tokens, the auxiliary heads."""

import helpers
import pytest
import torch
from torch import nn

from focus_detr.modeling.criterion import SetCriterion
from focus_detr.modeling.encoders.attention_map import decoder_attention_map, top_tokens_target
from focus_detr.modeling.encoders.base import EncoderLossInputs
from focus_detr.modeling.encoders.sparse import SparseEncoder
from focus_detr.modeling.matcher import HungarianMatcher
from focus_detr.modeling.structures import DecoderOutput

C = 32
SHAPES = [(4, 4), (2, 2)]  # strides 8 and 16 of a 32 x 32 input


def _one_point(x, y, weight, level):
    """(D=1, B=1, Q=1, H=1, L=2, P=1, 2) locations with one weighted point on ``level``."""
    locations = torch.zeros(1, 1, 1, 1, 2, 1, 2)
    weights = torch.zeros(1, 1, 1, 1, 2, 1)
    locations[..., level, 0, :] = torch.tensor([x, y])
    weights[..., level, 0] = weight
    return locations, weights


def test_one_sampling_point_splatted_by_hand():
    # Sparse DETR's util/dam.py (the default): cell coordinate = loc * size, no half-cell shift.
    # Level 0 is 4 x 4: (0.375, 0.5) -> (1.5, 2.0): half of the weight on cell (row 2, col 1),
    # half on (row 2, col 2)
    locations, weights = _one_point(0.375, 0.5, 0.8, level=0)
    grid = decoder_attention_map(locations, weights, SHAPES)
    expected = torch.zeros(1, 20)
    expected[0, 2 * 4 + 1] = 0.4
    expected[0, 2 * 4 + 2] = 0.4
    torch.testing.assert_close(grid, expected)
    # "sampling": where the deformable attention reads, (1.5 - 0.5, 2.0 - 0.5) = (1, 1.5):
    # half on (row 1, col 1), half on (row 2, col 1)
    grid = decoder_attention_map(locations, weights, SHAPES, alignment="sampling")
    expected = torch.zeros(1, 20)
    expected[0, 1 * 4 + 1] = 0.4
    expected[0, 2 * 4 + 1] = 0.4
    torch.testing.assert_close(grid, expected)
    # level 1 is 2 x 2, tokens 16..19: (0.5, 0.5) -> (1, 1): all of it on cell 19; "sampling":
    # (0.5, 0.5), a quarter on each cell
    locations, weights = _one_point(0.5, 0.5, 1.0, level=1)
    grid = decoder_attention_map(locations, weights, SHAPES)
    assert grid[0, 19] == 1.0 and grid.sum() == 1.0
    grid = decoder_attention_map(locations, weights, SHAPES, alignment="sampling")
    expected = torch.zeros(1, 20)
    expected[0, 16:] = 0.25
    torch.testing.assert_close(grid, expected)
    # (0.9, 0.125) on level 0 -> (3.6, 0.5): corners beyond the last column are dropped, the
    # rest is not renormalised: 0.4 * 0.5 on (row 0, col 3) and on (row 1, col 3)
    locations, weights = _one_point(0.9, 0.125, 1.0, level=0)
    grid = decoder_attention_map(locations, weights, SHAPES)
    expected = torch.zeros(1, 20)
    expected[0, 3] = expected[0, 4 + 3] = 0.2
    torch.testing.assert_close(grid, expected)


@pytest.mark.parametrize("alignment, low", [("reference", 0.05), ("sampling", 0.3)])
def test_points_outside_and_non_finite_are_dropped_and_sums_add_up(alignment, low):
    locations, weights = _one_point(1.5, 0.5, 1.0, level=0)  # outside the map
    assert decoder_attention_map(locations, weights, SHAPES, alignment=alignment).sum() == 0
    locations, weights = _one_point(float("nan"), 0.5, 1.0, level=0)
    assert decoder_attention_map(locations, weights, SHAPES, alignment=alignment).sum() == 0
    # random points whose four corners lie on the map keep their whole weight: on the 2 x 2
    # level, locations in [0.05, 0.45] ("reference": cells 0-1) or [0.3, 0.7] ("sampling")
    torch.manual_seed(0)
    locations = torch.rand(2, 3, 5, 2, 2, 3, 2) * 0.4 + low
    weights = torch.rand(2, 3, 5, 2, 2, 3)
    grid = decoder_attention_map(locations, weights, SHAPES, alignment=alignment)
    torch.testing.assert_close(grid.sum(1), weights.sum((0, 2, 3, 4, 5)))
    with pytest.raises(ValueError, match="alignment"):
        decoder_attention_map(locations, weights, SHAPES, alignment="centre")


def test_top_tokens_target():
    attention = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.9]])
    padding = torch.tensor([[False] * 4, [False, False, False, True]])
    target = top_tokens_target(attention, padding, [2, 1])
    assert target.tolist() == [[0, 1, 0, 1], [0, 0, 1, 0]]


def _encoder(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("keep_ratio", 0.25)
    encoder = SparseEncoder(
        embed_dim=C,
        num_layers=3,
        num_heads=4,
        num_levels=2,
        num_points=2,
        ffn_dim=64,
        num_classes=3,
        **kwargs,
    )
    return encoder, {"memory_projection": nn.Sequential(nn.Linear(C, C), nn.LayerNorm(C))}


def test_keeps_the_same_best_tokens_in_every_layer():
    encoder, heads = _encoder()
    features = helpers.make_features(SHAPES, channels=C, image_sizes=[(32, 32), (16, 24)])
    out = encoder.train()(features, heads)
    # image 0: floor(0.25 * 20) + 1 = 6 tokens; image 1: 8 valid -> 3
    assert out.extras["counts"] == (6, 3)
    assert all(indices is out.layer_indices[0] for indices in out.layer_indices)
    assert out.tokens_updated(features.padding_mask).tolist() == [[6, 3]] * 3
    ranking = out.token_scores.detach().masked_fill(features.padding_mask, float("-inf"))
    assert set(out.layer_indices[0][0, :6].tolist()) == set(ranking[0].topk(6).indices.tolist())
    changed = (out.memory != features.tokens).any(-1)
    assert changed.sum(1).tolist() == [6, 3]
    assert len(out.extras["aux_outputs"]) == 2  # after layers 0 and 1, not the last
    encoder.keep_ratio = 0.5
    assert encoder(features, heads).extras["counts"] == (11, 5)


TARGETS = [
    {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]] * 2)},
]


def _decoder_output(seed=1):
    torch.manual_seed(seed)
    locations = torch.rand(2, 2, 5, 4, 2, 2, 2)
    weights = torch.rand(2, 2, 5, 4, 2, 2)
    return DecoderOutput(torch.zeros(2, 2, 5, 3), torch.zeros(2, 2, 5, 4), locations, weights)


def _run_with_raw_logits(encoder, heads, features, padding_shift=0.0, shift=0.0):
    """The encoder's output and the scoring network's raw (B, N) logits, padding included
    (``padding_shift`` is added to the padded ones, ``shift`` to all)."""
    raw = []

    def record(module, args, out):
        raw.append(out + padding_shift * features.padding_mask + shift)
        return raw[0]

    encoder.scorer.register_forward_hook(record)
    return encoder.train()(features, heads), raw[0]


@pytest.mark.parametrize("padding_shift, padded_minimum", [(0.0, False), (-5.0, True)])
def test_saliency_loss_over_all_tokens_with_the_batch_minimum_on_padding(
    padding_shift, padded_minimum
):
    """Sparse DETR: multilabel_soft_margin_loss(mask_prediction, target) over all N tokens of
    the padded batch, padded logits set to the batch's smallest raw logit (with gradient), the
    padded raw logits included: a valid token's or a padded one's."""
    encoder, heads = _encoder()
    features = helpers.make_features(SHAPES, channels=C, image_sizes=[(32, 32), (16, 24)])
    padding = features.padding_mask
    out, raw = _run_with_raw_logits(encoder, heads, features, padding_shift)
    smallest = raw.min()
    assert padding.flatten()[raw.flatten().argmin()] == padded_minimum
    filled = torch.where(padding, smallest, raw)
    torch.testing.assert_close(out.token_scores, filled, rtol=0, atol=0)
    decoder = _decoder_output()
    criterion = SetCriterion(num_classes=3, matcher=HungarianMatcher())
    losses = encoder.losses(out, EncoderLossInputs(features, TARGETS, criterion, decoder))
    attention = decoder_attention_map(decoder.sampling_locations, decoder.attention_weights, SHAPES)
    target = top_tokens_target(attention, padding, out.extras["counts"])
    assert target.sum(1).tolist() == [6, 3] and not target[padding].any()
    # by hand: the mean of -[y log sigmoid(x) + (1 - y) log sigmoid(-x)] over the 2 x 20 tokens
    x, y = filled.double(), target.double()
    by_hand = -(y * x.sigmoid().log() + (1 - y) * (-x).sigmoid().log()).sum() / (2 * 20)
    torch.testing.assert_close(losses["loss_saliency"].double(), by_hand)
    official = nn.functional.multilabel_soft_margin_loss(filled, target)
    torch.testing.assert_close(losses["loss_saliency"], official)
    # the 12 padded entries' gradient reaches the token(s) with the smallest raw logit (the
    # padded ones all have the same logit: torch.min shares the gradient among exact ties)
    (grad,) = torch.autograd.grad(losses["loss_saliency"], raw)
    own = torch.where(padding, 0.0, (filled.sigmoid() - target) / 40)
    ties = raw == smallest
    assert ties.sum() == (12 if padded_minimum else 1)
    expected = own + ties * (smallest.sigmoid() / 40 * padding.sum() / ties.sum())
    torch.testing.assert_close(grad, expected)


def test_saliency_loss_per_image_over_valid_tokens():
    encoder, heads = _encoder(padded_batches="per_image")
    features = helpers.make_features(SHAPES, channels=C, image_sizes=[(32, 32), (16, 24)])
    out = encoder.train()(features, heads)
    decoder = _decoder_output()
    criterion = SetCriterion(num_classes=3, matcher=HungarianMatcher())
    losses = encoder.losses(out, EncoderLossInputs(features, TARGETS, criterion, decoder))
    attention = decoder_attention_map(decoder.sampling_locations, decoder.attention_weights, SHAPES)
    target = top_tokens_target(attention, features.padding_mask, out.extras["counts"])
    valid = ~features.padding_mask
    bce = nn.functional.binary_cross_entropy_with_logits(out.token_scores, target, reduction="none")
    expected = ((bce * valid).sum(1) / valid.sum(1)).mean()
    torch.testing.assert_close(losses["loss_saliency"], expected)


@pytest.mark.parametrize("padded_batches", ["reference", "per_image"])
def test_scoring_networks_global_mean(padded_batches):
    """Sparse DETR averages the global half over every token, padding included."""
    encoder, heads = _encoder(padded_batches=padded_batches)
    features = helpers.make_features(SHAPES, channels=C, image_sizes=[(32, 32), (16, 24)])
    scorer_inputs = []
    encoder.scorer.register_forward_pre_hook(lambda module, args: scorer_inputs.append(args[0]))
    _, raw = _run_with_raw_logits(encoder, heads, features)
    hidden = encoder.scorer.hidden_features(scorer_inputs[0])
    weights = torch.ones_like(features.padding_mask, dtype=hidden.dtype)
    if padded_batches == "per_image":
        weights = (~features.padding_mask).to(hidden.dtype)
    weights = weights[..., None]
    context = (hidden[..., C // 2 :] * weights).sum(1, keepdim=True) / weights.sum(1, True)
    torch.testing.assert_close(raw, encoder.scorer.score_hidden(hidden, context))


def test_gathered_tokens_rank_by_the_filled_logits_and_padding_can_be_gathered():
    # image 1 is 8 x 8: 2 valid tokens (0 and 16), budget int(0.5 * 2) + 1 = 2; image 0 keeps
    # 11, so image 1 gathers 9 padded tokens as well
    encoder, heads = _encoder(keep_ratio=0.5)
    features = helpers.make_features(SHAPES, channels=C, image_sizes=[(32, 32), (8, 8)])
    # valid token 16 of image 1 holds the batch's smallest logit: the padded tokens tie with it
    shift = torch.zeros(2, 20)
    shift[1, 16] = -10.0
    out, raw = _run_with_raw_logits(encoder, heads, features, shift=shift)
    assert raw.flatten().argmin() == 20 + 16
    assert out.extras["counts"] == (11, 2)
    indices = out.layer_indices[0]
    # Sparse DETR's batch top-K over the logits filled with the batch minimum (ranking padded
    # tokens last would put token 16 second)
    assert torch.equal(indices, out.token_scores.topk(11, dim=1).indices)
    assert indices[1, 0] == 0 and features.padding_mask.gather(1, indices).sum(1).tolist() == [0, 9]
    # image 1 writes its valid tokens among its first 2: token 16 only if the tie order put it
    # before the padded tokens, which are never written
    written = (~features.padding_mask[1, indices[1, :2]]).sum()
    assert out.layer_valid[0].sum(1).tolist() == [11, written]
    assert not (out.memory != features.tokens).any(-1)[features.padding_mask].any()


@pytest.mark.parametrize("padded_batches", ["reference", "per_image"])
def test_auxiliary_heads_score_every_gathered_token(padded_batches):
    """Sparse DETR's auxiliary heads score and match all K gathered tokens, with the updates of
    the tokens beyond an image's budget carried from layer to layer."""
    encoder, heads = _encoder(keep_ratio=0.5, padded_batches=padded_batches)
    features = helpers.make_features(SHAPES, channels=C, image_sizes=[(32, 32), (16, 8)])
    queries, outputs = [], []

    def record(module, args, out):
        queries.append(args[0])
        outputs.append(out)

    for layer in encoder.layers:
        layer.register_forward_hook(record)
    out = encoder.train()(features, heads)
    # image 1: 2 x 1 + 1 x 1 = 3 valid tokens, budget 2; K = 11: 9 tokens beyond its budget
    assert out.extras["counts"] == (11, 2)
    indices = out.layer_indices[0]
    assert out.layer_valid[0].sum(1).tolist() == [11, 2]
    # every layer's query is the previous layer's output, beyond the budget too
    for layer in (1, 2):
        torch.testing.assert_close(queries[layer], outputs[layer - 1], rtol=0, atol=0)
    proposals = features.proposals.gather(1, indices[..., None].expand(-1, -1, 4))
    assert not torch.isfinite(proposals[1]).all()  # padded (or border) tokens were gathered
    aux = out.extras["aux_outputs"]
    assert len(aux) == 2
    for layer, head_output in enumerate(aux):
        assert head_output["valid"] is None
        assert head_output["pred_logits"].shape == (2, 11, 3)
        torch.testing.assert_close(
            head_output["pred_logits"], encoder.aux_class_heads[layer](outputs[layer])
        )
        boxes = (encoder.aux_box_heads[layer](outputs[layer]) + proposals).sigmoid()
        torch.testing.assert_close(head_output["pred_boxes"], boxes)
        # an invalid proposal (+inf) gives the box (1, 1, 1, 1), as in Sparse DETR
        invalid = ~torch.isfinite(proposals).all(-1)
        assert (head_output["pred_boxes"][invalid] == 1).all()
    # the losses are the criterion's matched losses over every gathered token
    criterion = SetCriterion(num_classes=3, matcher=HungarianMatcher())
    losses = encoder.losses(out, EncoderLossInputs(features, TARGETS, criterion, _decoder_output()))
    aux_names = {f"loss_{t}_enc_aux_{i}" for t in ("class", "bbox", "giou") for i in (0, 1)}
    assert set(losses) == {"loss_saliency"} | aux_names
    for layer, head_output in enumerate(aux):
        matched = criterion.matched_losses(
            head_output["pred_logits"],
            head_output["pred_boxes"],
            TARGETS,
            suffix=f"_enc_aux_{layer}",
        )
        for name, value in matched.items():
            torch.testing.assert_close(losses[name], value)
    sum(losses.values()).backward()
    assert encoder.scorer.output_layers[-1].weight.grad.abs().sum() > 0
    assert encoder.aux_box_heads[0][0].weight.grad is not None


def test_auxiliary_heads_on_written_tokens_only():
    encoder, heads = _encoder(keep_ratio=0.5, aux_tokens="written")
    features = helpers.make_features(SHAPES, channels=C, image_sizes=[(32, 32), (16, 8)])
    out = encoder.train()(features, heads)
    kept = out.layer_indices[0]
    for aux in out.extras["aux_outputs"]:
        expected = out.layer_valid[0] & features.proposal_valid.gather(1, kept)
        assert torch.equal(aux["valid"], expected) and aux["valid"].sum(1).tolist()[1] <= 2
        assert torch.isfinite(aux["pred_boxes"]).all() and (aux["pred_boxes"] < 1).all()
    criterion = SetCriterion(num_classes=3, matcher=HungarianMatcher())
    losses = encoder.losses(out, EncoderLossInputs(features, TARGETS, criterion, _decoder_output()))
    aux = out.extras["aux_outputs"][1]
    matched = criterion.matched_losses(
        aux["pred_logits"], aux["pred_boxes"], TARGETS, suffix="_enc_aux_1", valid_mask=aux["valid"]
    )
    for name, value in matched.items():
        torch.testing.assert_close(losses[name], value)


def test_loss_needs_the_decoder_sampling():
    encoder, heads = _encoder()
    features = helpers.make_features(SHAPES, channels=C)
    out = encoder.train()(features, heads)
    with pytest.raises(ValueError, match="sampling"):
        encoder.losses(out, EncoderLossInputs(features, [], criterion=None, decoder=None))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"keep_ratio": 0.0}, "keep_ratio"),
        ({"num_layers": 0}, "num_layers"),
        ({"saliency_loss_weight": -1.0}, "-1.0"),
        ({"attention_map_alignment": "centre"}, "'centre'"),
        ({"padded_batches": "batch"}, "padded_batches.*'batch'"),
        ({"aux_tokens": "kept"}, "aux_tokens.*'kept'"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparseEncoder(embed_dim=C, num_heads=4, **kwargs)


def test_the_shared_loop_carries_unwritten_updates_and_writes_the_same_memory():
    """update_tokens(carry_unwritten=True): a layer with the previous layer's selection starts
    from that layer's output for every gathered token; only the tokens it does not write see a
    difference, so the memory is the one of the plain loop."""
    encoder, _ = _encoder(keep_ratio=0.5)
    features = helpers.make_features(SHAPES, channels=C, image_sizes=[(32, 32), (16, 8)])
    logits = torch.randn(2, 20, generator=torch.Generator().manual_seed(0))
    selections = encoder.select_tokens(features, logits, (1.0, 1.0, 1.0))
    assert selections[0].budgets == (11, 2) and selections[1] is selections[0]

    def update(layer, query, selected, memory):
        return query * 2.0 + layer + 1.0

    plain, plain_written = encoder.update_tokens(features, selections, update, keep_written=True)
    carried, outputs = encoder.update_tokens(
        features, selections, update, keep_written=True, carry_unwritten=True
    )
    torch.testing.assert_close(carried, plain, rtol=0, atol=0)
    gathered = features.tokens.gather(1, selections[0].indices[..., None].expand(-1, -1, C))
    # every gathered token: ((x * 2 + 1) * 2 + 2) * 2 + 3 after three layers
    torch.testing.assert_close(outputs[2], gathered * 8.0 + 11.0)
    # the plain loop writes back the input beyond the budget (image 1's last 9 tokens)
    valid = selections[0].valid[..., None]
    torch.testing.assert_close(plain_written[2], torch.where(valid, outputs[2], gathered))
    assert not valid[1, 2:].any()
