import math

import helpers
import pytest
import torch

from focus_detr.layers import KeyAwareDeformableAttention, MultiScaleDeformableAttention
from focus_detr.modeling.box_ops import inverse_sigmoid
from focus_detr.modeling.decoder import DINODecoder
from focus_detr.modeling.denoising import build_denoising_attn_mask

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
    """Queries, boxes, memory and features of two levels with odd sizes; image 1 is padded."""
    torch.manual_seed(1)
    # 6x5 and 3x3 cells at strides 8 and 16 (padded input 48x40); image 1 is 48x32
    features = helpers.make_features(
        ((6, 5), (3, 3)), batch=batch, channels=HIDDEN, image_sizes=[(48, 40), (48, 32)][:batch]
    )
    memory = torch.randn(batch, features.tokens.shape[1], HIDDEN)
    boxes = torch.rand(batch, queries, 4) * 0.5 + 0.25
    return torch.randn(batch, queries, HIDDEN), boxes, memory, features


def _run(decoder, queries, boxes, memory, features, mask=None, key_padding=None, **kwargs):
    out = decoder(queries, boxes, memory, features, mask, key_padding, **kwargs)
    return out.class_logits, out.boxes


def test_shapes_and_box_range():
    decoder = _decoder()
    queries, boxes, memory, features = _inputs()
    assert features.padding_mask[1].any() and not features.padding_mask[0].any()
    logits, boxes = _run(decoder, queries, boxes, memory, features)
    assert logits.shape == (3, 2, 6, 5) and boxes.shape == (3, 2, 6, 4)
    assert torch.isfinite(logits).all() and torch.isfinite(boxes).all()
    assert boxes.min() >= 0 and boxes.max() <= 1


def test_sampling_locations_on_request():
    decoder = _decoder()
    inputs = _inputs()
    out = decoder(*inputs, return_sampling=True)
    assert out.sampling_locations.shape == (3, 2, 6, 4, 2, 2, 2)
    assert out.attention_weights.shape == (3, 2, 6, 4, 2, 2)
    # softmax over levels x points per head
    assert torch.allclose(out.attention_weights.sum((-1, -2)), torch.ones(3, 2, 6, 4))
    plain = decoder(*inputs)
    assert plain.sampling_locations is None and plain.attention_weights is None
    assert torch.equal(plain.boxes, out.boxes) and torch.equal(plain.class_logits, out.class_logits)


@pytest.mark.parametrize("key_aware", [False, True])
def test_key_aware_cross_attention(key_aware):
    """Lite DETR's key_aware reaches the decoder: the cross-attention weights then come from the
    queries and the keys sampled from the memory, so they change with the memory."""
    decoder = _decoder(key_aware=key_aware)
    expected = KeyAwareDeformableAttention if key_aware else MultiScaleDeformableAttention
    assert all(type(layer.cross_attn) is expected for layer in decoder.layers)
    queries, boxes, memory, features = _inputs()
    out = decoder(queries, boxes, memory, features, return_sampling=True)
    assert out.sampling_locations.shape == (3, 2, 6, 4, 2, 2, 2)
    assert torch.allclose(out.attention_weights.sum((-1, -2)), torch.ones(3, 2, 6, 4))
    other = decoder(queries, boxes, memory.flip(1), features, return_sampling=True)
    # layer 0 sees the same queries and boxes: same locations; its weights differ iff key-aware
    assert torch.equal(other.sampling_locations[0], out.sampling_locations[0])
    assert torch.equal(other.attention_weights[0], out.attention_weights[0]) != key_aware
    (out.class_logits.sum() + out.boxes.sum()).backward()
    missing = [name for name, p in decoder.named_parameters() if p.grad is None]
    assert missing == []


def test_initial_heads():
    decoder = _decoder()
    queries, ref, memory, features = _inputs()
    logits, boxes = _run(decoder, queries, ref, memory, features)
    # zero-initialised box heads keep the input boxes; the class prior is 0.01
    assert torch.allclose(boxes, ref.expand_as(boxes), atol=1e-4)
    assert torch.allclose(decoder.class_heads[0].bias.sigmoid(), torch.full((5,), 0.01))


@pytest.mark.parametrize("refine_from_normed", [False, True])
def test_reference_update(refine_from_normed):
    """
    Hand-worked: the reference box layer 1 samples around is
    sigmoid(box_head_0(o_0) + logit(r_0)) with o_0 the raw output of layer 0 (the reference), or
    with norm(o_0) when refine_from_normed; the box layer 0 returns always uses norm(o_0).
    """
    decoder = _decoder(num_layers=2, refine_from_normed=refine_from_normed)
    for head in decoder.box_heads:
        torch.nn.init.normal_(head[-2].weight, std=0.5)
    # layer outputs are already layer-normed: a trained final norm's affine part differs
    torch.nn.init.normal_(decoder.norm.weight)
    torch.nn.init.normal_(decoder.norm.bias)
    queries, ref, memory, features = _inputs(batch=1)
    seen = {}
    decoder.layers[0].register_forward_hook(lambda m, a, out: seen.update(o0=out))
    decoder.layers[1].register_forward_pre_hook(lambda m, a: seen.update(boxes1=a[2]))
    out = decoder(queries, ref, memory, features)
    raw, normed = seen["o0"], decoder.norm(seen["o0"])
    eps = decoder.inverse_sigmoid_eps
    expected_returned = (decoder.box_heads[0](normed) + inverse_sigmoid(ref, eps)).sigmoid()
    refine_input = normed if refine_from_normed else raw
    expected_next = (decoder.box_heads[0](refine_input) + inverse_sigmoid(ref, eps)).sigmoid()
    assert torch.allclose(out.boxes[0], expected_returned, atol=1e-6)
    # layer 1 received the box on every level: no padding in this image (valid ratios 1)
    assert torch.allclose(seen["boxes1"][:, :, 0], expected_next, atol=1e-6)
    assert torch.allclose(seen["boxes1"][:, :, 1], expected_next, atol=1e-6)
    if not refine_from_normed:
        assert not torch.allclose(expected_next, expected_returned, atol=1e-3)


def test_inverse_sigmoid_hand_worked_values():
    # log(max(x, 1e-3) / max(1 - x, 1e-3)), each value worked out by hand
    x = torch.tensor([0.0, 1e-4, 1e-3, 0.3, 0.999, 1.0], dtype=torch.float64)
    ln10 = math.log(10)
    expected = torch.tensor(
        [
            -3 * ln10,  # 0: log(1e-3 / 1), the numerator clamped
            -3 * ln10 - math.log(0.9999),  # 1e-4: log(1e-3 / 0.9999)
            -3 * ln10 - math.log(0.999),  # 1e-3: log(1e-3 / 0.999)
            math.log(3) - math.log(7),  # 0.3: log(0.3 / 0.7)
            math.log(999),  # 0.999: log(0.999 / 1e-3), the denominator clamped
            3 * ln10,  # 1: log(1 / 1e-3)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(inverse_sigmoid(x), expected, rtol=1e-14, atol=1e-14)
    # torch.logit(x, eps) clamps x itself: at 0 it gives log(1e-3 / 0.999), not log(1e-3)
    assert torch.logit(x, 1e-3)[0].item() == pytest.approx(-3 * ln10 - math.log(0.999))


def test_look_forward_twice_gradient():
    decoder = _decoder()
    queries, ref, memory, features = _inputs()
    # make the box deltas non-zero so the boxes actually move
    for head in decoder.box_heads:
        torch.nn.init.normal_(head[-2].weight, std=0.1)
    _, boxes = _run(decoder, queries, ref, memory, features)

    def head_grads(layer_loss):
        decoder.zero_grad()
        layer_loss.backward(retain_graph=True)
        return [
            (h[-2].weight.grad is not None and h[-2].weight.grad.abs().sum() > 0)
            for h in decoder.box_heads
        ]

    # layer 1's box = sigmoid(delta_1 + logit(undetached box_0)): reaches heads 1 and 0
    assert head_grads(boxes[1].sum()) == [True, True, False]
    # ... but not further back: layer 2 trains heads 2 and 1 only
    assert head_grads(boxes[2].sum()) == [False, True, True]
    # the reference handed to the next layer is detached: no gradient into the input boxes
    ref.requires_grad_()
    _, boxes = _run(decoder, queries, ref, memory, features)
    boxes[2].sum().backward()
    assert ref.grad is None or ref.grad.abs().sum() == 0


def test_matching_queries_do_not_see_denoising_queries():
    decoder = _decoder()
    queries, ref, memory, features = _inputs(queries=3)
    matching = _run(decoder, queries, ref, memory, features)
    dn_queries, dn_boxes = torch.randn(2, 8, HIDDEN), torch.rand(2, 8, 4) * 0.5 + 0.25
    mask = build_denoising_attn_mask(2, 4, 3)
    both = _run(
        decoder,
        torch.cat([dn_queries, queries], 1),
        torch.cat([dn_boxes, ref], 1),
        memory,
        features,
        mask,
    )
    assert torch.allclose(both[0][:, :, 8:], matching[0], atol=1e-5)
    assert torch.allclose(both[1][:, :, 8:], matching[1], atol=1e-5)


def test_key_padding_hides_padded_denoising_slots():
    decoder = _decoder()
    queries, ref, memory, features = _inputs(queries=7)
    mask = build_denoising_attn_mask(1, 4, 3)
    key_padding = torch.zeros(2, 7, dtype=torch.bool)
    key_padding[1, [1, 3]] = True
    first = _run(decoder, queries, ref, memory, features, mask, key_padding)
    changed = queries.clone()
    changed[1, [1, 3]] = 100.0
    second = _run(decoder, changed, ref, memory, features, mask, key_padding)
    keep = torch.ones(7, dtype=torch.bool)
    keep[[1, 3]] = False
    assert torch.allclose(first[0][:, 1, keep], second[0][:, 1, keep], atol=1e-5)
    assert torch.allclose(first[0][:, 0], second[0][:, 0], atol=1e-5)
    # without the key padding mask the real queries of the group would read the padded slots
    leaky = _run(decoder, changed, ref, memory, features, mask)
    assert not torch.allclose(first[0][:, 1, [0, 2]], leaky[0][:, 1, [0, 2]], atol=1e-3)


def test_gradients_reach_all_parameters():
    decoder = _decoder()
    logits, boxes = _run(decoder, *_inputs())
    for head in decoder.box_heads:
        torch.nn.init.normal_(head[-2].weight, std=0.1)
    logits, boxes = _run(decoder, *_inputs())
    (logits.sum() + boxes.sum()).backward()
    missing = [name for name, p in decoder.named_parameters() if p.grad is None]
    assert missing == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_layers": 0},
        {"embed_dim": 31, "num_heads": 1},
        {"dropout": 1.0},
        {"inverse_sigmoid_eps": 0.0},
    ],
)
def test_constructor_validation(kwargs):
    with pytest.raises(ValueError):
        _decoder(**kwargs)
