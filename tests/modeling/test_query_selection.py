import math

import pytest
import torch

from focus_detr.modeling.query_selection import TwoStageQuerySelection, generate_proposals

SHAPES = torch.tensor([[4, 4], [2, 2]])
NUM_TOKENS = 20
HIDDEN = 32


def _selector(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("hidden_dim", HIDDEN)
    kwargs.setdefault("num_classes", 5)
    kwargs.setdefault("num_queries", 6)
    return TwoStageQuerySelection(**kwargs)


def _padding():
    padding = torch.zeros(2, NUM_TOKENS, dtype=torch.bool)
    # image 1 is 3/4 wide and 1/2 high: level 0 keeps a 2x3 block, level 1 a 1x2 block
    level0 = torch.ones(4, 4, dtype=torch.bool)
    level0[:2, :3] = False
    level1 = torch.ones(2, 2, dtype=torch.bool)
    level1[:1, :2] = False
    padding[1] = torch.cat([level0.flatten(), level1.flatten()])
    return padding


def test_proposals_by_hand():
    padding = torch.zeros(1, 5, dtype=torch.bool)
    proposals, valid = generate_proposals(padding, torch.tensor([[2, 2], [1, 1]]))
    expected = torch.tensor(
        [
            [0.25, 0.25, 0.05, 0.05],
            [0.75, 0.25, 0.05, 0.05],
            [0.25, 0.75, 0.05, 0.05],
            [0.75, 0.75, 0.05, 0.05],
            [0.5, 0.5, 0.1, 0.1],
        ]
    )
    assert valid.all()
    assert torch.allclose(proposals[0].sigmoid(), expected, atol=1e-6)


def test_invalid_proposals_are_inf():
    padding = _padding()
    proposals, valid = generate_proposals(padding, SHAPES, base_scale=0.6)
    # level-1 side 1.2 is out of (0.01, 0.99): every level-1 token is invalid
    assert not valid[:, 16:].any()
    assert torch.equal(valid[:, :16], ~padding[:, :16])
    assert torch.isinf(proposals[~valid]).all() and (proposals[~valid] > 0).all()
    assert torch.isfinite(proposals[valid]).all()


def test_valid_frame_normalises_by_valid_size():
    padding = _padding()
    proposals, valid = generate_proposals(padding, SHAPES, frame="valid")
    boxes = proposals[1, :16].sigmoid().view(4, 4, 4)
    # valid width 3 cells, valid height 2 cells at level 0
    assert torch.allclose(boxes[0, :3, 0], torch.tensor([1 / 6, 3 / 6, 5 / 6]), atol=1e-6)
    assert torch.allclose(boxes[:2, 0, 1], torch.tensor([0.25, 0.75]), atol=1e-6)
    assert torch.equal(valid[1], ~padding[1])
    # the padded frame ignores the padding: quarters of the padded width
    proposals, _ = generate_proposals(padding, SHAPES, frame="padded")
    boxes = proposals[1, :16].sigmoid().view(4, 4, 4)
    assert torch.allclose(boxes[0, :3, 0], torch.tensor([1 / 8, 3 / 8, 5 / 8]), atol=1e-6)


def test_output_shapes_and_gradients():
    selector = _selector()
    memory = torch.randn(2, NUM_TOKENS, HIDDEN, requires_grad=True)
    out = selector(memory, _padding(), SHAPES)
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


def test_never_picks_padded_tokens():
    selector = _selector(num_queries=6)
    # make padded tokens the most attractive if they were not masked
    with torch.no_grad():
        selector.class_head.bias.fill_(10.0)
    memory = torch.randn(2, NUM_TOKENS, HIDDEN)
    padding = _padding()
    memory[padding] = 1e4
    out = selector(memory, padding, SHAPES)
    assert not padding.gather(1, out.topk_indices).any()
    assert out.topk_valid.all()


def test_fewer_valid_tokens_than_queries():
    selector = _selector(num_queries=12)
    padding = _padding()  # image 1 has 6 + 2 = 8 valid tokens
    out = selector(torch.randn(2, NUM_TOKENS, HIDDEN), padding, SHAPES)
    assert out.topk_valid[0].all()
    assert out.topk_valid[1].tolist() == [True] * 8 + [False] * 4
    assert not padding[1].gather(0, out.topk_indices[1, :8]).any()
    for tensor in (out.enc_boxes, out.reference_boxes, out.enc_logits):
        assert torch.isfinite(tensor).all()
    out.enc_boxes.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in selector.box_head.parameters())


def test_num_queries_clamped_to_tokens():
    out = _selector(num_queries=50)(torch.randn(2, NUM_TOKENS, HIDDEN), _padding(), SHAPES)
    assert out.queries.shape == (2, NUM_TOKENS, HIDDEN)
    assert out.topk_indices.shape == (2, NUM_TOKENS)


def test_initialisation():
    selector = _selector()
    prior = -math.log((1 - 0.01) / 0.01)
    assert torch.allclose(selector.class_head.bias, torch.full((5,), prior))
    assert torch.all(selector.box_head.layers[-1].weight == 0)


@pytest.mark.parametrize(
    "kwargs", [{"num_queries": 0}, {"base_scale": 0.0}, {"frame": "image"}, {"prior_prob": 1.0}]
)
def test_constructor_validation(kwargs):
    with pytest.raises(ValueError):
        _selector(**kwargs)
