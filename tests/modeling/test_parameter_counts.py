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


LAYER_NORM = GROUP_NORM = 2 * C  # weight + bias
# nn.MultiheadAttention: packed q/k/v projection (3C x C + 3C) and the output projection
SELF_ATTENTION = 3 * C * C + 3 * C + linear(C, C)  # 263,168
# deformable attention: offsets (H*L*P*2 per query), weights (H*L*P), value and output projections
DEFORMABLE = (
    linear(C, HEADS * LEVELS * POINTS * 2) + linear(C, HEADS * LEVELS * POINTS) + 2 * linear(C, C)
)  # 230,272
FEEDFORWARD = linear(C, FFN) + linear(FFN, C)  # 1,050,880
DEFORMABLE_LAYER = DEFORMABLE + LAYER_NORM + FEEDFORWARD + LAYER_NORM  # 1,282,176
DUAL_ATTENTION_LAYER = SELF_ATTENTION + LAYER_NORM + DEFORMABLE_LAYER  # 1,545,856
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
DECODER = (
    6 * DUAL_ATTENTION_LAYER  # the decoder layer has the same parts: self-attn, deformable, FFN
    + linear(2 * C, C)
    + linear(C, C)  # query position MLP of the box sine embedding (512 -> 256 -> 256)
    + LAYER_NORM
    + 6 * (CLASS_HEAD + BOX_HEAD)
)  # 10,391,800
QUERY_SELECTION = linear(C, C) + LAYER_NORM + CLASS_HEAD + BOX_HEAD + QUERIES * C  # 449,876
DENOISING = CLASSES * C  # label embedding
LEVEL_EMBED = LEVELS * C

ENCODERS = {
    "focus_detr_r50_4scale_12ep.py": 6 * DUAL_ATTENTION_LAYER + SCORER + (LEVELS - 1),
    "dino_r50_4scale_12ep.py": 6 * DEFORMABLE_LAYER,
    # 6 layers, the scorer without modulation, auxiliary heads after layers 0..4
    "sparse_detr_r50_4scale_12ep.py": 6 * DEFORMABLE_LAYER + SCORER + 5 * (CLASS_HEAD + BOX_HEAD),
    # (2+1)x3: 6 high-level layers, 3 all-level layers with a 256-wide low-level FFN + LN
    "lite_detr_r50_4scale_12ep.py": 9 * DEFORMABLE_LAYER
    + 3 * (linear(C, 256) + linear(256, C) + LAYER_NORM),
}


def _count(module):
    return sum(parameter.numel() for parameter in module.parameters())


@pytest.mark.parametrize("config", sorted(ENCODERS))
def test_r50_parameter_counts(config, single_thread):
    model = instantiate(LazyConfig.load(f"{CONFIG_DIR}/{config}").model)
    counts = {
        "backbone": _count(model.backbone),
        "neck": _count(model.neck),
        "encoder": _count(model.encoder),
        "decoder": _count(model.decoder),
        "query_selection": _count(model.query_selection),
        "denoising": _count(model.denoising),
        "level_embed": model.level_embed.numel(),
    }
    assert counts == {
        "backbone": BACKBONE,
        "neck": NECK,
        "encoder": ENCODERS[config],
        "decoder": DECODER,
        "query_selection": QUERY_SELECTION,
        "denoising": DENOISING,
        "level_embed": LEVEL_EMBED,
    }
    assert _count(model) == sum(counts.values())
