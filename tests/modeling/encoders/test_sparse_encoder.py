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
    # level 0 is 4 x 4: location (0.375, 0.5) is pixel (0.375 * 4 - 0.5, 0.5 * 4 - 0.5) = (1, 1.5)
    # in cell-centre units: half of the weight on cell (row 1, col 1), half on (row 2, col 1)
    locations, weights = _one_point(0.375, 0.5, 0.8, level=0)
    grid = decoder_attention_map(locations, weights, SHAPES)
    expected = torch.zeros(1, 20)
    expected[0, 1 * 4 + 1] = 0.4
    expected[0, 2 * 4 + 1] = 0.4
    torch.testing.assert_close(grid, expected)
    # level 1 is 2 x 2, tokens 16..19: (0.5, 0.5) -> pixel (0.5, 0.5): a quarter on each cell
    locations, weights = _one_point(0.5, 0.5, 1.0, level=1)
    grid = decoder_attention_map(locations, weights, SHAPES)
    expected = torch.zeros(1, 20)
    expected[0, 16:] = 0.25
    torch.testing.assert_close(grid, expected)
    # Sparse DETR's code splats at loc * size (no half-cell offset): (1, 1) on level 1 -> cell 19
    grid = decoder_attention_map(locations, weights, SHAPES, alignment="reference")
    assert grid[0, 19] == 1.0 and grid.sum() == 1.0


def test_points_outside_and_non_finite_are_dropped_and_sums_add_up():
    locations, weights = _one_point(1.5, 0.5, 1.0, level=0)  # outside the map
    assert decoder_attention_map(locations, weights, SHAPES).sum() == 0
    locations, weights = _one_point(float("nan"), 0.5, 1.0, level=0)
    assert decoder_attention_map(locations, weights, SHAPES).sum() == 0
    # random points strictly inside the cell-centre hull keep their whole weight
    torch.manual_seed(0)
    locations = torch.rand(2, 3, 5, 2, 2, 3, 2) * 0.5 + 0.25
    weights = torch.rand(2, 3, 5, 2, 2, 3)
    grid = decoder_attention_map(locations, weights, SHAPES)
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


def test_losses_saliency_target_and_matched_auxiliary_heads():
    encoder, heads = _encoder()
    features = helpers.make_features(SHAPES, channels=C, image_sizes=[(32, 32), (16, 24)])
    out = encoder.train()(features, heads)
    targets = [
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]] * 2)},
    ]
    torch.manual_seed(1)
    locations = torch.rand(2, 2, 5, 4, 2, 2, 2)
    weights = torch.rand(2, 2, 5, 4, 2, 2)
    decoder = DecoderOutput(torch.zeros(2, 2, 5, 3), torch.zeros(2, 2, 5, 4), locations, weights)
    criterion = SetCriterion(num_classes=3, matcher=HungarianMatcher())
    losses = encoder.losses(out, EncoderLossInputs(features, targets, criterion, decoder))
    aux_names = {f"loss_{t}_enc_aux_{i}" for t in ("class", "bbox", "giou") for i in (0, 1)}
    assert set(losses) == {"loss_saliency"} | aux_names
    # the saliency loss is the BCE against the top tokens of the splatted decoder attention
    attention = decoder_attention_map(locations, weights, SHAPES)
    target = top_tokens_target(attention, features.padding_mask, out.extras["counts"])
    assert target.sum(1).tolist() == [6, 3]
    valid = ~features.padding_mask
    bce = nn.functional.binary_cross_entropy_with_logits(out.token_scores, target, reduction="none")
    expected = ((bce * valid).sum(1) / valid.sum(1)).mean()
    torch.testing.assert_close(losses["loss_saliency"], expected)
    # the auxiliary losses are the criterion's matched losses of those heads
    aux = out.extras["aux_outputs"][1]
    matched = criterion.matched_losses(
        aux["pred_logits"], aux["pred_boxes"], targets, suffix="_enc_aux_1", valid_mask=aux["valid"]
    )
    for name, value in matched.items():
        torch.testing.assert_close(losses[name], value)
    sum(losses.values()).backward()
    assert encoder.scorer.output_layers[-1].weight.grad.abs().sum() > 0
    assert encoder.aux_box_heads[0][0].weight.grad is not None


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
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparseEncoder(embed_dim=C, num_heads=4, **kwargs)
