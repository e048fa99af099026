import math

import helpers
import pytest
import torch

from focus_detr.modeling.query_selection import TwoStageQuerySelection

HIDDEN = 32
NUM_TOKENS = 20  # levels of 4x4 and 2x2 cells


def _selector(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("hidden_dim", HIDDEN)
    kwargs.setdefault("num_classes", 5)
    kwargs.setdefault("num_queries", 6)
    return TwoStageQuerySelection(**kwargs)


def _features(base_scale=0.05):
    """Image 0 fills the 32x32 input; image 1 is 16x24: level 0 keeps 2x3 cells, level 1 1x2."""
    from focus_detr.modeling.multi_scale import generate_proposals, level_padding_masks

    features = helpers.make_features(
        ((4, 4), (2, 2)), channels=HIDDEN, image_sizes=[(32, 32), (16, 24)]
    )
    masks = level_padding_masks([(32, 32), (16, 24)], (32, 32), [(4, 4), (2, 2)], "cpu")
    features.proposals, features.proposal_valid = generate_proposals(
        masks, torch.float32, base_scale=base_scale
    )
    return features


def test_output_shapes_and_gradients():
    selector = _selector()
    memory = torch.randn(2, NUM_TOKENS, HIDDEN, requires_grad=True)
    out = selector(memory, _features())
    assert out.queries.shape == (2, 6, HIDDEN)
    assert out.reference_boxes.shape == (2, 6, 4) and not out.reference_boxes.requires_grad
    assert out.enc_logits.shape == (2, 6, 5) and out.enc_boxes.shape == (2, 6, 4)
    assert out.topk_indices.shape == (2, 6) and out.topk_indices.dtype == torch.int64
    assert torch.equal(out.queries[0], selector.content_queries.weight)
    assert torch.allclose(out.reference_boxes, out.enc_boxes)
    (out.enc_logits.sum() + out.enc_boxes.sum() + out.queries.sum()).backward()
    for name, param in selector.named_parameters():
        assert param.grad is not None, name
    # the selected logits are the max-logit ranking of the tokens
    scores = out.enc_logits.max(-1).values
    assert torch.all(scores[:, :-1] >= scores[:, 1:])


@pytest.mark.parametrize("select_invalid_tokens", [True, False])
def test_never_picks_padded_tokens_when_they_score_low(select_invalid_tokens):
    selector = _selector(num_queries=6, select_invalid_tokens=select_invalid_tokens)
    features = _features()
    memory = torch.randn(2, NUM_TOKENS, HIDDEN)
    memory[features.padding_mask] = 1e4  # ignored: invalid tokens' memory is zeroed
    out = selector(memory, features)
    assert out.topk_valid[0].all()
    if not select_invalid_tokens:
        assert not features.padding_mask.gather(1, out.topk_indices).any()
        assert out.topk_valid.all()


def _attract_invalid_tokens(selector):
    """Zeroed (invalid) tokens score high, real tokens along -u score low."""
    direction = torch.randn(HIDDEN)
    with torch.no_grad():
        selector.memory_projection[0].weight.copy_(torch.eye(HIDDEN))
        selector.memory_projection[0].bias.copy_(10 * direction)
        selector.class_head.weight.zero_()
        selector.class_head.weight[0] = direction
        selector.class_head.bias.zero_()
    return direction


def test_reference_selects_invalid_tokens_with_unit_boxes():
    """Reference behaviour: the top-k runs over every token; invalid ones get box (1, 1, 1, 1)."""
    selector = _selector(num_queries=6, select_invalid_tokens=True)
    direction = _attract_invalid_tokens(selector)
    features = _features(base_scale=0.6)  # level-1 proposals (side 1.2) are all invalid
    memory = (-100 * direction).expand(2, NUM_TOKENS, HIDDEN).clone()
    out = selector(memory, features)
    picked_invalid = ~out.topk_valid
    assert picked_invalid[0].sum() == 4  # the four level-1 tokens of image 0
    assert torch.equal(
        out.enc_boxes[picked_invalid], torch.ones_like(out.enc_boxes[picked_invalid])
    )
    out.enc_boxes.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in selector.parameters() if p.grad is not None)

    # the departure ranks invalid tokens last
    departure = _selector(num_queries=6, select_invalid_tokens=False)
    _attract_invalid_tokens(departure)
    assert departure(memory, features).topk_valid[0].all()


def test_padded_tokens_compete_in_the_reference():
    """
    When the zeroed tokens score best, the reference picks padded tokens of the small image
    (box (1, 1, 1, 1)); ``select_padded_tokens=False`` ranks padding last, so an image picks
    the same tokens alone or in any batch.
    """
    features = _features()
    padding = features.padding_mask
    picks = {}
    for select_padded in (True, False):
        selector = _selector(num_queries=6, select_padded_tokens=select_padded)
        direction = _attract_invalid_tokens(selector)
        memory = (-100 * direction).expand(2, NUM_TOKENS, HIDDEN).clone()
        out = selector(memory, features)
        picks[select_padded] = padding.gather(1, out.topk_indices)
        picked = out.enc_boxes[picks[select_padded]]
        assert torch.equal(picked, torch.ones_like(picked))
    assert picks[True][1].all() and not picks[True][0].any()  # image 0 has no padding
    assert not picks[False].any()


def test_fewer_valid_tokens_than_queries():
    selector = _selector(num_queries=12, select_invalid_tokens=False)
    features = _features()  # image 1 has 6 + 2 = 8 valid tokens
    out = selector(torch.randn(2, NUM_TOKENS, HIDDEN), features)
    assert out.topk_valid[0].all()
    assert out.topk_valid[1].tolist() == [True] * 8 + [False] * 4
    assert not features.padding_mask[1].gather(0, out.topk_indices[1, :8]).any()
    for tensor in (out.enc_boxes, out.reference_boxes, out.enc_logits):
        assert torch.isfinite(tensor).all()
    out.enc_boxes.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in selector.box_head.parameters())


def test_num_queries_clamped_to_tokens():
    out = _selector(num_queries=50)(torch.randn(2, NUM_TOKENS, HIDDEN), _features())
    assert out.queries.shape == (2, NUM_TOKENS, HIDDEN)
    assert out.topk_indices.shape == (2, NUM_TOKENS)


def test_initialisation_and_shared_heads():
    selector = _selector()
    prior = -math.log((1 - 0.01) / 0.01)
    assert torch.allclose(selector.class_head.bias, torch.full((5,), prior))
    assert torch.all(selector.box_head[-2].weight == 0)
    shared = selector.shared_heads()
    assert shared["class_head"] is selector.class_head
    assert shared["memory_projection"] is selector.memory_projection


@pytest.mark.parametrize(
    "kwargs", [{"num_queries": 0}, {"base_scale": 0.0}, {"prior_prob": 1.0}, {"hidden_dim": -1}]
)
def test_constructor_validation(kwargs):
    with pytest.raises(ValueError):
        _selector(**kwargs)
