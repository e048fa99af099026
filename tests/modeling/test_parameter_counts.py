"""
Pinned parameter counts of the R50 configs of every encoder, each derived by hand below (so a
reader can check it without running the code): an architecture change must be deliberate.
"""

import pytest
from detectron2.config import LazyConfig, instantiate
from helpers import CONFIG_DIR

C, FFN, HEADS, LEVELS, POINTS, CLASSES, QUERIES = 256, 2048, 8, 4, 4, 80, 900


def linear(inputs: int, outputs: int) -> int:
    return inputs * outputs + outputs  # weight + bias


LAYER_NORM = GROUP_NORM = BATCH_NORM = 2 * C  # weight + bias
# nn.MultiheadAttention: packed q/k/v projection (3C x C + 3C) and the output projection
SELF_ATTENTION = 3 * C * C + 3 * C + linear(C, C)  # 263,168


def deformable(levels: int = LEVELS) -> int:
    """Deformable attention: offsets (H*L*P*2 per query), weights (H*L*P), value and output
    projections."""
    return (
        linear(C, HEADS * levels * POINTS * 2)
        + linear(C, HEADS * levels * POINTS)
        + 2 * linear(C, C)
    )  # 230,272 at 4 levels, 205,600 at 3


def key_aware_deformable(levels: int = LEVELS) -> int:
    """Lite DETR's key-aware attention: offsets, query, value (= key) and output projections; no
    attention-weight layer, no key projection."""
    return linear(C, HEADS * levels * POINTS * 2) + 3 * linear(C, C)  # 263,168 at 4 levels


def dual_attention_layer(levels: int = LEVELS, attention=deformable) -> int:
    return SELF_ATTENTION + LAYER_NORM + attention(levels) + LAYER_NORM + FEEDFORWARD + LAYER_NORM


FEEDFORWARD = linear(C, FFN) + linear(FFN, C)  # 1,050,880
DEFORMABLE_LAYER = deformable() + LAYER_NORM + FEEDFORWARD + LAYER_NORM  # 1,282,176
DUAL_ATTENTION_LAYER = dual_attention_layer()  # 1,545,856
# scoring network LN -> 256 -> (128 -> 64 -> 1), plus Focus's 3 modulation coefficients
SCORER = LAYER_NORM + linear(C, C) + linear(C, C // 2) + linear(C // 2, C // 4) + linear(C // 4, 1)
BOX_HEAD = 2 * linear(C, C) + linear(C, 4)  # 132,612
CLASS_HEAD = linear(C, CLASSES)  # 20,560

BACKBONE = 23_454_912  # detectron2's ResNet-50 res2-res5 (FrozenBN) without its classifier
NECK = (
    sum(linear(channels, C) + GROUP_NORM for channels in (512, 1024, 2048))  # 1x1 conv + GN
    + 9 * 2048 * C
    + C
    + GROUP_NORM  # 3x3 stride-2 conv on res5 + GN
)  # 5,639,168


def decoder(levels: int = LEVELS, attention=deformable) -> int:
    return (
        6 * dual_attention_layer(levels, attention)  # decoder layer: self-attn, cross-attn, FFN
        + linear(2 * C, C)
        + linear(C, C)  # query position MLP of the box sine embedding (512 -> 256 -> 256)
        + LAYER_NORM
        + 6 * (CLASS_HEAD + BOX_HEAD)
    )  # 10,391,800 at 4 levels; 10,243,768 at 3 (6 x 24,672 fewer offset and weight parameters);
    # 10,589,176 key-aware at 4 levels (6 x 32,896 more: a query projection for the weights)


QUERY_SELECTION = linear(C, C) + LAYER_NORM + CLASS_HEAD + BOX_HEAD + QUERIES * C  # 449,876
DENOISING = CLASSES * C  # label embedding

# RT-DETR's R50 setting: the neck is its input projection, a 1x1 conv without bias + batch norm
# on res3-res5 (no extra level)
HYBRID_NECK = sum(channels * C + BATCH_NORM for channels in (512, 1024, 2048))  # 919,040
# AIFI: one post-norm transformer layer, FFN 1024
AIFI_LAYER = SELF_ATTENTION + linear(C, 1024) + linear(1024, C) + 2 * LAYER_NORM  # 789,760
CONV_BN_1X1, CONV_BN_3X3 = C * C + BATCH_NORM, 9 * C * C + BATCH_NORM  # convs without bias
# CSP layer 2C -> C: two 1x1 branches, 3 RepVGG blocks (3x3 and 1x1 conv + BN), no conv3
CSP_LAYER = 2 * (2 * C * C + BATCH_NORM) + 3 * (CONV_BN_3X3 + CONV_BN_1X1)  # 2,232,320
# CCFF on 3 levels: 2 lateral 1x1 and 2 downsampling 3x3 convs, 2 top-down + 2 bottom-up CSPs
CCFF = 2 * CONV_BN_1X1 + 2 * CONV_BN_3X3 + 4 * CSP_LAYER  # 10,242,048

# Lite DETR's layers (hidden 256, FFN 2048): a high-level-only layer is a deformable encoder layer;
# an all-level layer adds the low-level FFN 256 -> 256 -> 256 and its LN
LITE_LOW_FFN = linear(C, C) + linear(C, C) + LAYER_NORM  # 132,096
LITE_HIGH_LAYER = DEFORMABLE_LAYER  # 1,282,176
LITE_ALL_LAYER = DEFORMABLE_LAYER + LITE_LOW_FFN  # 1,414,272
KEY_AWARE_LAYER = key_aware_deformable() + LAYER_NORM + FEEDFORWARD + LAYER_NORM  # 1,315,072
# H3L1-(2+1)x3 = [high, all] x 3, 6 layers: 8,089,344 plain, 8,286,720 key-aware. The layer
# list of Lite DETR's code gives the same key-aware total (3 x (1,315,072 + 1,447,168)); its
# plain attention also builds the unused query projection (6 x 65,792 more: 8,484,096 listed).
LITE_2X3 = 3 * (LITE_HIGH_LAYER + LITE_ALL_LAYER)
LITE_2X3_KEY_AWARE = 3 * (KEY_AWARE_LAYER + KEY_AWARE_LAYER + LITE_LOW_FFN)
# H3L1-(6+1)x1 = [high] x 5 + [all]: 8,022,528 key-aware, as the official layer list
LITE_6X1_KEY_AWARE = 5 * KEY_AWARE_LAYER + KEY_AWARE_LAYER + LITE_LOW_FFN

# config: (neck, encoder, decoder, level embedding)
MODELS = {
    "focus_detr_r50_4scale_12ep.py": (
        NECK,
        6 * DUAL_ATTENTION_LAYER + SCORER + (LEVELS - 1),
        decoder(),
        LEVELS * C,
    ),
    "dino_r50_4scale_12ep.py": (NECK, 6 * DEFORMABLE_LAYER, decoder(), LEVELS * C),
    # 6 layers, the scorer without modulation, auxiliary heads after layers 0..4
    "sparse_detr_r50_4scale_12ep.py": (
        NECK,
        6 * DEFORMABLE_LAYER + SCORER + 5 * (CLASS_HEAD + BOX_HEAD),
        decoder(),
        LEVELS * C,
    ),
    "lite_detr_r50_4scale_12ep.py": (NECK, LITE_2X3, decoder(), LEVELS * C),
    # key-aware in the encoder and in the decoder's cross-attention
    "lite_detr_r50_keyaware_4scale_12ep.py": (
        NECK,
        LITE_2X3_KEY_AWARE,
        decoder(attention=key_aware_deformable),
        LEVELS * C,
    ),
    # no level embedding (3 x 256 unused parameters): the hybrid encoder uses no position embedding
    "rtdetr_hybrid_r50_3scale_12ep.py": (HYBRID_NECK, AIFI_LAYER + CCFF, decoder(3), 0),
}


def test_hand_counts_of_the_parts():
    """The sub-totals quoted in the comments above."""
    assert (deformable(), deformable(3)) == (230_272, 205_600)
    assert (decoder(), decoder(3)) == (10_391_800, 10_243_768)
    assert (HYBRID_NECK, AIFI_LAYER, CSP_LAYER, CCFF) == (919_040, 789_760, 2_232_320, 10_242_048)
    assert AIFI_LAYER + CCFF == 11_031_808
    assert decoder(attention=key_aware_deformable) == 10_589_176
    # Lite DETR: the totals its code's layer list gives (official classes instantiated, see
    # docs/differences_from_reference.md), and the dense 6-layer encoder for scale
    assert (KEY_AWARE_LAYER, KEY_AWARE_LAYER + LITE_LOW_FFN) == (1_315_072, 1_447_168)
    assert (LITE_2X3_KEY_AWARE, LITE_6X1_KEY_AWARE) == (8_286_720, 8_022_528)
    assert (LITE_2X3, 6 * DEFORMABLE_LAYER) == (8_089_344, 7_693_056)


def _count(module):
    return sum(parameter.numel() for parameter in module.parameters())


@pytest.mark.parametrize("config", sorted(MODELS))
def test_r50_parameter_counts(config, single_thread):
    model = instantiate(LazyConfig.load(f"{CONFIG_DIR}/{config}").model)
    neck, encoder, decoder_count, level_embed = MODELS[config]
    counts = {
        "backbone": _count(model.backbone),
        "neck": _count(model.neck),
        "encoder": _count(model.encoder),
        "decoder": _count(model.decoder),
        "query_selection": _count(model.query_selection),
        "denoising": _count(model.denoising),
        "level_embed": 0 if model.level_embed is None else model.level_embed.numel(),
    }
    assert counts == {
        "backbone": BACKBONE,
        "neck": neck,
        "encoder": encoder,
        "decoder": decoder_count,
        "query_selection": QUERY_SELECTION,
        "denoising": DENOISING,
        "level_embed": level_embed,
    }
    assert _count(model) == sum(counts.values())


@pytest.mark.parametrize(
    "options, expected",
    [
        (dict(high_updates_per_block=2, num_blocks=3, key_aware=True), LITE_2X3_KEY_AWARE),
        (dict(high_updates_per_block=6, num_blocks=1, key_aware=True), LITE_6X1_KEY_AWARE),
        (dict(high_updates_per_block=2, num_blocks=3, key_aware=False), LITE_2X3),
    ],
)
def test_lite_encoder_counts_of_both_official_schedules(options, expected):
    from focus_detr.modeling import LiteEncoder

    encoder = LiteEncoder(embed_dim=C, num_heads=HEADS, ffn_dim=FFN, low_ffn_dim=C, **options)
    assert encoder.num_layers == 6 and _count(encoder) == expected
