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


def test_schedule_2_plus_1_times_3():
    encoder = _lite(num_high_levels=3, high_updates_per_block=2, num_blocks=3)
    assert encoder.schedule == ["high", "high", "all"] * 3 and encoder.num_layers == 9
    assert encoder.updated_levels() == [[1, 2, 3], [1, 2, 3], [0, 1, 2, 3]] * 3
    kinds = [type(layer) for layer in encoder.layers]
    assert kinds.count(LiteAllLevelLayer) == 3


def test_schedule_3_plus_1_times_2_with_two_high_levels():
    encoder = _lite(num_high_levels=2, high_updates_per_block=3, num_blocks=2)
    assert encoder.schedule == ["high", "high", "high", "all"] * 2
    assert encoder.updated_levels() == [[2, 3], [2, 3], [2, 3], [0, 1, 2, 3]] * 2


def test_high_layers_leave_low_level_tokens_unchanged():
    encoder = _lite(num_high_levels=3, high_updates_per_block=2, num_blocks=1)
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
    encoder = _lite(num_blocks=1)
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
        ({"high_updates_per_block": -1}, "high_updates_per_block"),
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
