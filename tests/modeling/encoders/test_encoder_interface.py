"""What every encoder declares through DETREncoder, and the token-sparse loop Focus and Sparse
DETR share."""

import helpers
import pytest
import torch

from focus_detr.modeling.encoders import (
    DenseEncoder,
    DETREncoder,
    FocusEncoder,
    HybridEncoder,
    LiteEncoder,
    SparseEncoder,
)
from focus_detr.modeling.encoders.token_sparse import TokenSparseEncoder

C = 32
SHARED = dict(embed_dim=C, num_heads=4, num_levels=2, num_points=2, ffn_dim=64)
ENCODERS = {
    "dense": (DenseEncoder, dict(num_layers=3)),
    "focus": (FocusEncoder, dict(num_layers=3, layer_keep_factors=(1.0, 0.5, 0.5), topk_sa=4)),
    "sparse": (SparseEncoder, dict(num_layers=3, num_classes=3)),
    "lite": (LiteEncoder, dict(num_high_levels=1, high_updates_per_block=3, num_blocks=1)),
}


def _build(kind: str, **overrides) -> DETREncoder:
    cls, own = ENCODERS[kind]
    torch.manual_seed(0)
    return cls(**{**SHARED, **own, **overrides})


@pytest.mark.parametrize("kind", list(ENCODERS))
def test_every_encoder_declares_its_width_levels_layers_and_keep_ratio(kind):
    encoder = _build(kind)
    assert isinstance(encoder, DETREncoder)
    assert (encoder.embed_dim, encoder.num_levels, encoder.num_layers) == (C, 2, 3)
    assert len(encoder.layers) == 3
    # the shared layer arguments reach every layer
    attention = encoder.layers[0].deformable_attn
    assert (attention.num_heads, attention.num_levels, attention.num_points) == (4, 2, 2)
    assert encoder.layers[0].ffn[0].out_features == 64
    # declared on the class, so tools can tell without building the model
    assert type(encoder).has_keep_ratio is (kind in ("focus", "sparse"))
    if type(encoder).has_keep_ratio:
        encoder.keep_ratio = 0.3
        assert encoder.keep_ratio == 0.3
        with pytest.raises(ValueError, match="keep_ratio must be in"):
            encoder.keep_ratio = 1.5


@pytest.mark.parametrize("kind", list(ENCODERS))
@pytest.mark.parametrize("name, value", [("embed_dim", 0), ("num_levels", -1)])
def test_bad_shared_sizes_are_named(kind, name, value):
    with pytest.raises(ValueError, match=f"{name} must be a positive int, got {value}"):
        _build(kind, **{name: value})


def test_the_hybrid_encoder_declares_its_sizes_and_what_it_needs():
    encoder = HybridEncoder(embed_dim=C, num_levels=3, num_heads=4, ffn_dim=64, num_blocks=1)
    assert isinstance(encoder, DETREncoder)
    # AIFI on the coarsest level, the top-down and the bottom-up pass
    assert (encoder.embed_dim, encoder.num_levels, encoder.num_layers) == (C, 3, 3)
    assert HybridEncoder(embed_dim=C, aifi_levels=(0, 2), num_aifi_layers=2).num_layers == 6
    cls = type(encoder)
    assert (cls.has_keep_ratio, cls.uses_position_embedding, cls.keeps_own_init) == (
        False,
        False,
        True,
    )
    # the deformable encoders read the position embedding and take the reference init
    for kind in ENCODERS:
        assert ENCODERS[kind][0].uses_position_embedding and not ENCODERS[kind][0].keeps_own_init
    for name, value in (("embed_dim", 0), ("num_levels", -1)):
        with pytest.raises(ValueError, match=f"{name} must be a positive int, got {value}"):
            HybridEncoder(**{"embed_dim": C, name: value})


def test_lite_takes_its_layer_count_from_its_blocks():
    with pytest.raises(ValueError, match="LiteEncoder takes no num_layers"):
        _build("lite", num_layers=4)


class _Probe(TokenSparseEncoder):
    """The loop alone: a layer adds (layer index + 1) * 100 to the tokens it is given."""

    def __init__(self):
        super().__init__(keep_ratio=0.5, num_layers=3, **SHARED)


def test_the_shared_loop_writes_each_images_budget_and_nothing_else():
    encoder = _Probe()
    features = helpers.make_features(((4, 4), (2, 2)), channels=C, image_sizes=[(32, 32), (16, 24)])
    assert features.valid_token_counts == (20, 8)
    logits = torch.randn(2, 20, generator=torch.Generator().manual_seed(0))
    selections = encoder.select_tokens(features, logits, (1.0, 0.5, 0.5))
    # n = (11, 5); layer sizes (11, 5, 5); the last two layers share one selection
    assert [s.indices.shape[1] for s in selections] == [11, 5, 5]
    assert [s.budgets for s in selections] == [(11, 5), (5, 2), (5, 2)]
    assert selections[2] is selections[1]
    seen = []

    def update(layer, query, selected, memory):
        seen.append((layer, query.shape, memory.shape))
        return query + (layer + 1) * 100.0

    memory, written = encoder.update_tokens(features, selections, update, keep_written=True)
    assert [shape for _, shape, _ in seen] == [(2, 11, C), (2, 5, C), (2, 5, C)]
    assert len(written) == 3
    change = (memory - features.tokens)[..., 0].round()
    for image, (first, later) in enumerate(((11, 5), (5, 2))):
        order = selections[0].indices[image]
        expected = torch.zeros(20)
        expected[order[:first]] += 100.0
        expected[order[:later]] += 200.0 + 300.0
        assert torch.equal(change[image], expected)
    assert not change[features.padding_mask].any()
    # the best-scored valid tokens come first
    ranking = logits.masked_fill(features.padding_mask, float("-inf"))
    assert torch.equal(selections[0].indices, ranking.topk(11, dim=1).indices)
