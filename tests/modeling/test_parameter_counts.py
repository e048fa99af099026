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


def dual_attention_layer(levels: int = LEVELS) -> int:
    return SELF_ATTENTION + LAYER_NORM + deformable(levels) + LAYER_NORM + FEEDFORWARD + LAYER_NORM


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


def decoder(levels: int = LEVELS) -> int:
    return (
        6 * dual_attention_layer(levels)  # the decoder layer: self-attn, deformable, FFN
        + linear(2 * C, C)
        + linear(C, C)  # query position MLP of the box sine embedding (512 -> 256 -> 256)
        + LAYER_NORM
        + 6 * (CLASS_HEAD + BOX_HEAD)
    )  # 10,391,800 at 4 levels; 10,243,768 at 3 (6 x 24,672 fewer offset and weight parameters)


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

# config: (neck, encoder, transformer levels, level embedding)
MODELS = {
    "focus_detr_r50_4scale_12ep.py": (
        NECK,
        6 * DUAL_ATTENTION_LAYER + SCORER + (LEVELS - 1),
        LEVELS,
        LEVELS * C,
    ),
    "dino_r50_4scale_12ep.py": (NECK, 6 * DEFORMABLE_LAYER, LEVELS, LEVELS * C),
    # 6 layers, the scorer without modulation, auxiliary heads after layers 0..4
    "sparse_detr_r50_4scale_12ep.py": (
        NECK,
        6 * DEFORMABLE_LAYER + SCORER + 5 * (CLASS_HEAD + BOX_HEAD),
        LEVELS,
        LEVELS * C,
    ),
    # (2+1)x3: 6 high-level layers, 3 all-level layers with a 256-wide low-level FFN + LN
    "lite_detr_r50_4scale_12ep.py": (
        NECK,
        9 * DEFORMABLE_LAYER + 3 * (linear(C, 256) + linear(256, C) + LAYER_NORM),
        LEVELS,
        LEVELS * C,
    ),
    # no level embedding (3 x 256 unused parameters): the hybrid encoder uses no position embedding
    "rtdetr_hybrid_r50_3scale_12ep.py": (HYBRID_NECK, AIFI_LAYER + CCFF, 3, 0),
}


def test_hand_counts_of_the_parts():
    """The sub-totals quoted in the comments above."""
    assert (deformable(), deformable(3)) == (230_272, 205_600)
    assert (decoder(), decoder(3)) == (10_391_800, 10_243_768)
    assert (HYBRID_NECK, AIFI_LAYER, CSP_LAYER, CCFF) == (919_040, 789_760, 2_232_320, 10_242_048)
    assert AIFI_LAYER + CCFF == 11_031_808


def _count(module):
    return sum(parameter.numel() for parameter in module.parameters())


@pytest.mark.parametrize("config", sorted(MODELS))
def test_r50_parameter_counts(config, single_thread):
    model = instantiate(LazyConfig.load(f"{CONFIG_DIR}/{config}").model)
    neck, encoder, levels, level_embed = MODELS[config]
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
        "decoder": decoder(levels),
        "query_selection": QUERY_SELECTION,
        "denoising": DENOISING,
        "level_embed": level_embed,
    }
    assert _count(model) == sum(counts.values())
