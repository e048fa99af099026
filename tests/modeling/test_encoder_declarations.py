"""
What the meta-architecture does with an encoder's declarations: an encoder that uses no position
embedding gets none (no level embedding without a gradient), and an encoder that keeps its own
initialisation keeps it under the reference Xavier initialisation.
"""

from dataclasses import replace

import pytest
import torch
from detectron2.config import instantiate
from helpers import make_batched_inputs, make_features, tiny_model_config

from focus_detr.modeling import TwoStageDETR
from focus_detr.modeling.position_encoding import PositionEmbeddingSine

pytestmark = pytest.mark.usefixtures("single_thread")


def _model(encoder: str, *, seed: int = 0, **overrides) -> TwoStageDETR:
    cfg = tiny_model_config(encoder=encoder)
    for key, value in overrides.items():
        cfg[key] = value
    torch.manual_seed(seed)
    return instantiate(cfg)


def test_the_hybrid_model_has_no_position_or_level_embedding():
    model = _model("hybrid")
    assert not type(model.encoder).uses_position_embedding
    assert model.position_embedding is None and model.level_embed is None
    assert not any("level_embed" in name for name in model.state_dict())
    features = model.flatten_features(model.preprocess_image(make_batched_inputs()))
    assert features.pos is None
    # the other encoders read pos: they get it, with the level embedding
    dense = _model("dense")
    assert dense.level_embed.shape == (4, 32)
    assert dense.flatten_features(dense.preprocess_image(make_batched_inputs())).pos is not None


def test_every_parameter_of_the_hybrid_model_gets_a_gradient():
    # DistributedDataParallel without find_unused_parameters needs a gradient for every
    # parameter: a level embedding the hybrid encoder never reads would have none
    model = _model("hybrid").train()
    losses = model(make_batched_inputs())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_a_position_embedding_for_an_encoder_that_uses_none_is_an_error():
    cfg = tiny_model_config(encoder="hybrid")
    parts = {key: instantiate(value) for key, value in cfg.items() if key != "_target_"}
    embedding = PositionEmbeddingSine(num_pos_feats=16)
    with pytest.raises(ValueError, match="HybridEncoder does not use a position embedding"):
        TwoStageDETR(**parts, position_embedding=embedding)


def test_an_encoder_that_uses_pos_rejects_features_without_it():
    encoder = _model("dense").encoder
    features = replace(make_features(((8, 8), (4, 4), (2, 2), (1, 1))), pos=None)
    with pytest.raises(ValueError, match="DenseEncoder uses the position embedding"):
        encoder(features, {})


def _encoder_state(model: TwoStageDETR):
    return {name: value.clone() for name, value in model.encoder.state_dict().items()}


@pytest.mark.parametrize("encoder, keeps", [("hybrid", True), ("dense", False)])
def test_reference_init_spares_an_encoder_that_keeps_its_own(encoder, keeps):
    # same seed: the modules are built with the same draws, then transformer_init applies
    reference = _model(encoder, transformer_init="xavier")
    own = _model(encoder, transformer_init="module")
    assert type(reference.encoder).keeps_own_init is keeps
    expected, actual = _encoder_state(own), _encoder_state(reference)
    same = [name for name in expected if torch.equal(expected[name], actual[name])]
    if keeps:
        assert same == list(expected)
    else:
        # the FFN matrices are redrawn (Xavier); the deformable attention's offsets and
        # weights come back to their fixed initialisation
        ffn = [name for name, value in expected.items() if ".ffn." in name and value.dim() > 1]
        assert ffn and not set(ffn) & set(same)
    # the decoder is re-initialised either way
    assert not torch.equal(
        reference.decoder.layers[0].ffn[0].weight, own.decoder.layers[0].ffn[0].weight
    )
