"""Lite DETR's interleaved update schedule and the dense DINO encoder."""

import helpers
import pytest
import torch

from focus_detr.layers import KeyAwareDeformableAttention, MultiScaleDeformableAttention
from focus_detr.modeling.encoders.dense import DenseEncoder
from focus_detr.modeling.encoders.lite import LiteAllLevelLayer, LiteEncoder

C = 32
SHAPES = [(8, 8), (4, 4), (2, 2), (1, 1)]  # 64 low-level tokens, then 16 + 4 + 1 high-level


def _lite(**kwargs):
    torch.manual_seed(0)
    return LiteEncoder(
        embed_dim=C, num_heads=4, num_levels=4, num_points=2, ffn_dim=64, low_ffn_dim=16, **kwargs
    )


def _updated_tokens(encoder, features):
    """Per layer, which of the 85 tokens of every image it changed (B, N) bool."""
    before, changed = [], []
    for layer in encoder.layers:
        layer.register_forward_pre_hook(lambda module, args: before.append(args[3]))
    out = encoder(features, {})
    for memory_before, memory_after in zip(before, before[1:] + [out.memory]):
        changed.append((memory_after != memory_before).any(-1))
    return out, changed


@pytest.mark.parametrize(
    "high_updates_per_block, num_blocks, schedule",
    [
        # Lite DETR's H3L1-(2+1)x3: [high, all] x 3
        (2, 3, ["high", "all"] * 3),
        # H3L1-(6+1)x1: five high-level layers, then one all-level layer
        (6, 1, ["high"] * 5 + ["all"]),
    ],
)
def test_official_schedules_have_six_layers(high_updates_per_block, num_blocks, schedule):
    encoder = _lite(
        num_high_levels=3, high_updates_per_block=high_updates_per_block, num_blocks=num_blocks
    )
    assert encoder.schedule == schedule and encoder.num_layers == len(encoder.layers) == 6
    assert [type(layer) is LiteAllLevelLayer for layer in encoder.layers] == [
        kind == "all" for kind in schedule
    ]
    high, every = [1, 2, 3], [0, 1, 2, 3]
    assert encoder.updated_levels() == [every if kind == "all" else high for kind in schedule]
    assert f"({high_updates_per_block}+1)x{num_blocks}" in repr(encoder)
    # the tokens each layer changes: the valid high-level ones (strides 16-64, tokens 64-84),
    # or every valid token in an all-level layer
    features = helpers.make_features(SHAPES, channels=C, image_sizes=[(64, 64), (40, 56)])
    _, changed = _updated_tokens(encoder, features)
    valid = ~features.padding_mask
    high_valid = valid.clone()
    high_valid[:, :64] = False
    for kind, tokens in zip(schedule, changed):
        # padded tokens are queries too (as in Lite DETR): they may change, valid ones must
        torch.testing.assert_close(tokens & valid, high_valid if kind == "high" else valid)


def test_schedule_3_plus_1_times_2_with_two_high_levels():
    encoder = _lite(num_high_levels=2, high_updates_per_block=3, num_blocks=2)
    assert encoder.schedule == ["high", "high", "all"] * 2
    assert encoder.updated_levels() == [[2, 3], [2, 3], [0, 1, 2, 3]] * 2


def test_high_layers_leave_low_level_tokens_unchanged():
    encoder = _lite(num_high_levels=3, high_updates_per_block=3, num_blocks=1)
    features = helpers.make_features(SHAPES, channels=C, image_sizes=[(64, 64), (40, 56)])
    seen = []
    for layer in encoder.layers:
        layer.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    out = encoder(features, {})
    # layers 0 and 1 take the 21 high-level tokens as queries, layer 2 all 85
    assert [query.shape[1] for query, _ in seen] == [21, 21, 85]
    # the low-level tokens reach the all-level layer untouched
    torch.testing.assert_close(seen[2][0][:, :64], features.tokens[:, :64])
    assert out.layer_indices[0][0].tolist() == list(range(64, 85))
    assert out.layer_indices[2] is None
    counts = out.tokens_updated(features.padding_mask)
    valid = (~features.padding_mask).sum(1)
    high_valid = (~features.padding_mask[:, 64:]).sum(1)
    assert counts.tolist() == [high_valid.tolist(), high_valid.tolist(), valid.tolist()]


def test_low_level_tokens_use_the_small_ffn():
    encoder = _lite(num_blocks=1)  # (2+1)x1: [high, all]
    layer = encoder.layers[-1]
    assert layer.low_ffn[0].out_features == 16 and layer.ffn[0].out_features == 64
    features = helpers.make_features(SHAPES, channels=C)
    calls = []
    layer.low_ffn.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[1]))
    layer.ffn.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[1]))
    encoder(features, {})
    assert calls == [64, 21]


@pytest.mark.parametrize("key_aware", [False, True])
def test_key_aware_option_and_gradients(key_aware):
    encoder = _lite(num_blocks=1, key_aware=key_aware)
    expected = KeyAwareDeformableAttention if key_aware else MultiScaleDeformableAttention
    assert all(isinstance(layer.deformable_attn, expected) for layer in encoder.layers)
    features = helpers.make_features(SHAPES, channels=C, image_sizes=[(64, 64), (40, 56)])
    features.tokens.requires_grad_(True)
    out = encoder(features, {})
    out.memory.square().sum().backward()
    assert features.tokens.grad.abs().sum() > 0
    assert all(p.grad is not None for p in encoder.parameters())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_high_levels": 4}, "num_high_levels"),
        ({"num_high_levels": 0}, "num_high_levels"),
        ({"num_blocks": 0}, "num_blocks"),
        ({"high_updates_per_block": 0}, "high_updates_per_block"),
        ({"num_layers": 6}, "num_layers"),
    ],
)
def test_lite_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _lite(**kwargs)


def test_dense_encoder_updates_every_token_with_the_current_memory():
    torch.manual_seed(0)
    encoder = DenseEncoder(
        embed_dim=C, num_layers=2, num_heads=4, num_levels=4, num_points=2, ffn_dim=64
    )
    features = helpers.make_features(SHAPES, channels=C, image_sizes=[(64, 64), (40, 56)])
    values = []
    for layer in encoder.layers:
        layer.register_forward_pre_hook(lambda m, args: values.append(args[3]))
    out = encoder(features, {})
    assert out.layer_indices == [None, None]
    valid = (~features.padding_mask).sum(1).tolist()
    assert out.tokens_updated(features.padding_mask).tolist() == [valid, valid]
    # layer 1 reads the memory layer 0 wrote, not the initial tokens
    assert values[0] is features.tokens and not torch.equal(values[1], features.tokens)
    assert (out.memory != features.tokens).any(-1)[~features.padding_mask].all()
    assert out.token_scores is None
    with pytest.raises(ValueError, match="num_layers"):
        DenseEncoder(embed_dim=C, num_heads=4, num_layers=0)
