import pytest
import torch

from focus_detr.modeling.decoder import DINODecoder
from focus_detr.modeling.denoising import build_denoising_attn_mask

SHAPES = torch.tensor([[6, 5], [3, 3]])  # two levels, odd sizes
LEVEL_START = torch.tensor([0, 30])
NUM_TOKENS = 39
HIDDEN = 32


def _decoder(**kwargs):
    torch.manual_seed(0)
    defaults = dict(
        num_layers=3,
        embed_dim=HIDDEN,
        num_heads=4,
        feedforward_dim=64,
        num_levels=2,
        num_points=2,
        num_classes=5,
    )
    defaults.update(kwargs)
    return DINODecoder(**defaults)


def _inputs(batch=2, queries=6):
    torch.manual_seed(1)
    memory = torch.randn(batch, NUM_TOKENS, HIDDEN)
    padding = torch.zeros(batch, NUM_TOKENS, dtype=torch.bool)
    padding[1, 25:30] = True  # last column of level 0 of image 1
    padding[1, 36:39] = True
    valid_ratios = torch.ones(batch, 2, 2)
    valid_ratios[1] = torch.tensor([[0.8, 1.0], [2 / 3, 1.0]])
    boxes = torch.rand(batch, queries, 4) * 0.5 + 0.25
    return torch.randn(batch, queries, HIDDEN), boxes, memory, padding, valid_ratios


def _run(decoder, queries, boxes, memory, padding, valid_ratios, mask=None, key_padding=None):
    return decoder(
        queries, boxes, memory, padding, SHAPES, LEVEL_START, valid_ratios, mask, key_padding
    )


@pytest.mark.parametrize("frame", ["padded", "valid"])
def test_shapes_and_box_range(frame):
    decoder = _decoder(frame=frame)
    logits, boxes = _run(decoder, *_inputs())
    assert logits.shape == (3, 2, 6, 5) and boxes.shape == (3, 2, 6, 4)
    assert torch.isfinite(logits).all() and torch.isfinite(boxes).all()
    assert boxes.min() >= 0 and boxes.max() <= 1


def test_initial_heads():
    decoder = _decoder()
    queries, ref, memory, padding, ratios = _inputs()
    logits, boxes = _run(decoder, queries, ref, memory, padding, ratios)
    # zero-initialised box heads keep the input boxes; the class prior is 0.01
    assert torch.allclose(boxes, ref.expand_as(boxes), atol=1e-4)
    assert torch.allclose(decoder.class_heads[0].bias.sigmoid(), torch.full((5,), 0.01))


def test_valid_frame_with_unit_ratios_equals_padded_frame():
    queries, ref, memory, padding, _ = _inputs()
    ones = torch.ones(2, 2, 2)
    padded = _run(_decoder(frame="padded"), queries, ref, memory, padding, ones)
    valid = _run(_decoder(frame="valid"), queries, ref, memory, padding, ones)
    assert torch.allclose(padded[0], valid[0]) and torch.allclose(padded[1], valid[1])


def test_look_forward_twice_gradient():
    decoder = _decoder()
    queries, ref, memory, padding, ratios = _inputs()
    # make the box deltas non-zero so the boxes actually move
    for head in decoder.box_heads:
        torch.nn.init.normal_(head.layers[-1].weight, std=0.1)
    _, boxes = _run(decoder, queries, ref, memory, padding, ratios)

    def head_grads(layer_loss):
        decoder.zero_grad()
        layer_loss.backward(retain_graph=True)
        return [
            (h.layers[-1].weight.grad is not None and h.layers[-1].weight.grad.abs().sum() > 0)
            for h in decoder.box_heads
        ]

    # layer 1's box = sigmoid(delta_1 + logit(undetached box_0)): reaches heads 1 and 0
    assert head_grads(boxes[1].sum()) == [True, True, False]
    # ... but not further back: layer 2 trains heads 2 and 1 only
    assert head_grads(boxes[2].sum()) == [False, True, True]
    # the reference handed to the next layer is detached: no gradient into the input boxes
    ref.requires_grad_()
    _, boxes = _run(decoder, queries, ref, memory, padding, ratios)
    boxes[2].sum().backward()
    assert ref.grad is None or ref.grad.abs().sum() == 0


def test_matching_queries_do_not_see_denoising_queries():
    decoder = _decoder()
    queries, ref, memory, padding, ratios = _inputs(queries=3)
    matching = _run(decoder, queries, ref, memory, padding, ratios)
    dn_queries, dn_boxes = torch.randn(2, 8, HIDDEN), torch.rand(2, 8, 4) * 0.5 + 0.25
    mask = build_denoising_attn_mask(2, 4, 3)
    both = _run(
        decoder,
        torch.cat([dn_queries, queries], 1),
        torch.cat([dn_boxes, ref], 1),
        memory,
        padding,
        ratios,
        mask,
    )
    assert torch.allclose(both[0][:, :, 8:], matching[0], atol=1e-5)
    assert torch.allclose(both[1][:, :, 8:], matching[1], atol=1e-5)


def test_key_padding_hides_padded_denoising_slots():
    decoder = _decoder()
    queries, ref, memory, padding, ratios = _inputs(queries=7)
    mask = build_denoising_attn_mask(1, 4, 3)
    key_padding = torch.zeros(2, 7, dtype=torch.bool)
    key_padding[1, [1, 3]] = True
    first = _run(decoder, queries, ref, memory, padding, ratios, mask, key_padding)
    changed = queries.clone()
    changed[1, [1, 3]] = 100.0
    second = _run(decoder, changed, ref, memory, padding, ratios, mask, key_padding)
    keep = torch.ones(7, dtype=torch.bool)
    keep[[1, 3]] = False
    assert torch.allclose(first[0][:, 1, keep], second[0][:, 1, keep], atol=1e-5)
    assert torch.allclose(first[0][:, 0], second[0][:, 0], atol=1e-5)
    # without the key padding mask the real queries of the group would read the padded slots
    leaky = _run(decoder, changed, ref, memory, padding, ratios, mask)
    assert not torch.allclose(first[0][:, 1, [0, 2]], leaky[0][:, 1, [0, 2]], atol=1e-3)


def test_gradients_reach_all_parameters():
    decoder = _decoder()
    logits, boxes = _run(decoder, *_inputs())
    for head in decoder.box_heads:
        torch.nn.init.normal_(head.layers[-1].weight, std=0.1)
    logits, boxes = _run(decoder, *_inputs())
    (logits.sum() + boxes.sum()).backward()
    missing = [name for name, p in decoder.named_parameters() if p.grad is None]
    assert missing == []


@pytest.mark.parametrize(
    "kwargs",
    [{"num_layers": 0}, {"embed_dim": 31, "num_heads": 1}, {"frame": "image"}, {"dropout": 1.0}],
)
def test_constructor_validation(kwargs):
    with pytest.raises(ValueError):
        _decoder(**kwargs)
