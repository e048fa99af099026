"""RT-DETR's hybrid encoder: AIFI's position embedding, the CCFF blocks, FLOPs and padding."""

import math
from dataclasses import replace

import helpers
import pytest
import torch
from torch import nn

from focus_detr.modeling.encoders.aifi import AIFILayer, sincos_position_embedding_2d
from focus_detr.modeling.encoders.ccff import CrossScaleFusion
from focus_detr.modeling.encoders.hybrid import HybridEncoder
from focus_detr.modeling.encoders.hybrid_blocks import (
    CSPRepLayer,
    RepVggBlock,
    fuse_rep_vgg_blocks,
)

pytestmark = pytest.mark.usefixtures("single_thread")

C = 16
# ceil-halving level shapes with odd sizes: the upsampled maps are cropped
ODD_SHAPES = ((7, 9), (4, 5), (2, 3))


def _encoder(**kwargs):
    torch.manual_seed(0)
    options = dict(embed_dim=C, num_heads=2, ffn_dim=32, num_blocks=2)
    return HybridEncoder(**{**options, **kwargs})


def _randomize_batch_norms(module: nn.Module, seed: int = 1) -> None:
    """Running statistics and affine parameters away from their identity initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, nn.BatchNorm2d):
                shape = norm.running_mean.shape
                norm.running_mean.copy_(torch.rand(shape, generator=generator) - 0.5)
                norm.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
                norm.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
                norm.bias.copy_(torch.rand(shape, generator=generator) - 0.5)


# --- AIFI's position embedding ------------------------------------------------------------------


def _embedding_row(a: float, b: float):
    # embed_dim 8: 2 frequencies, omega = (10000 ** (-0 / 2), 10000 ** (-1 / 2)) = (1, 1 / 100)
    return [
        math.sin(a),
        math.sin(a / 100),
        math.cos(a),
        math.cos(a / 100),
        math.sin(b),
        math.sin(b / 100),
        math.cos(b),
        math.cos(b / 100),
    ]


def test_position_embedding_of_a_2x3_map_by_hand():
    # tokens row-major: n = 0..5 are (row, col) = (0,0) (0,1) (0,2) (1,0) (1,1) (1,2).
    # RT-DETR ("column_major"): a = n // h, b = n % h with h = 2
    expected = [_embedding_row(a, b) for a, b in [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]]
    embedding = sincos_position_embedding_2d(2, 3, 8, temperature=10000.0, dtype=torch.float64)
    torch.testing.assert_close(embedding, torch.tensor(expected, dtype=torch.float64))
    # "row_major": a = row, b = col
    expected = [_embedding_row(a, b) for a, b in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]]
    embedding = sincos_position_embedding_2d(2, 3, 8, layout="row_major", dtype=torch.float64)
    torch.testing.assert_close(embedding, torch.tensor(expected, dtype=torch.float64))


def test_position_embedding_temperature_and_layouts_on_square_maps():
    # temperature 4, embed_dim 8: omega = (1, 4 ** (-1 / 2)) = (1, 1 / 2); token 5 of a 3x3
    # map is (row 1, col 2) in both layouts
    embedding = sincos_position_embedding_2d(3, 3, 8, temperature=4.0, dtype=torch.float64)
    expected = [math.sin(1), math.sin(0.5), math.cos(1), math.cos(0.5)]
    expected += [math.sin(2), math.sin(1), math.cos(2), math.cos(1)]
    torch.testing.assert_close(embedding[5], torch.tensor(expected, dtype=torch.float64))
    row_major = sincos_position_embedding_2d(3, 3, 8, temperature=4.0, layout="row_major")
    torch.testing.assert_close(row_major, embedding.float())


@pytest.mark.parametrize(
    "kwargs, message",
    [({"embed_dim": 6}, "multiple of 4, got 6"), ({"layout": "xy"}, "'xy'")],
)
def test_position_embedding_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sincos_position_embedding_2d(2, 2, **{"embed_dim": 8, **kwargs})


# --- RepVGG fusion ------------------------------------------------------------------------------


def test_rep_vgg_fuse_gives_the_eval_output():
    torch.manual_seed(0)
    block = RepVggBlock(channels=C, activation="silu").double()
    _randomize_batch_norms(block)
    block.eval()
    x = torch.randn(2, C, 5, 6, dtype=torch.float64)
    expected = block(x)
    block.fuse()
    assert not hasattr(block, "conv3x3") and block.fused.kernel_size == (3, 3)
    torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-12)


def test_fused_encoder_gives_the_same_memory():
    encoder = _encoder().double()
    _randomize_batch_norms(encoder)
    encoder.eval()
    features = helpers.make_features(
        ODD_SHAPES, channels=C, image_sizes=[(56, 72), (30, 40)], dtype=torch.float64
    )
    expected = encoder(features, {}).memory
    assert fuse_rep_vgg_blocks(encoder) == 2 * 2 * 2  # 2 blocks x 2 CSP layers x 2 passes
    torch.testing.assert_close(encoder(features, {}).memory, expected, rtol=0, atol=1e-10)


def test_fuse_needs_batch_norms():
    block = RepVggBlock(channels=32, norm="GN")
    with pytest.raises(ValueError, match="GroupNorm"):
        block.fuse()


# --- FLOPs ---------------------------------------------------------------------------------------

fvcore_nn = pytest.importorskip("fvcore.nn")


def _flops(module, inputs):
    from focus_detr.layers.flop_count import ALL_FLOP_HANDLES

    analysis = fvcore_nn.FlopCountAnalysis(module, inputs).set_op_handle(**ALL_FLOP_HANDLES)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return dict(analysis.by_operator())


def test_csp_layer_flops_by_hand():
    # CCFF's block: CSPRepLayer(2C -> C, 3 RepVGG blocks) on a (B, 2C, H, W) map, eval mode
    batch, height, width = 2, 5, 6
    layer = CSPRepLayer(in_channels=2 * C, out_channels=C, num_blocks=3).eval()
    counts = _flops(layer, (torch.randn(batch, 2 * C, height, width),))
    pixels = batch * height * width
    # conv1, conv2: 1x1, 2C -> C; each RepVGG block: 3x3 C -> C and 1x1 C -> C
    convs = pixels * (2 * (2 * C * C) + 3 * (9 * C * C + C * C))
    # fvcore: an eval-mode BatchNorm costs 2 per output element (scale and shift); 2 + 3 * 2 norms
    norms = pixels * 2 * C * (2 + 3 * 2)
    assert counts == {"conv": convs, "batch_norm": norms}  # SiLU and the sum are not counted

    fuse_rep_vgg_blocks(layer)
    counts = _flops(layer, (torch.randn(batch, 2 * C, height, width),))
    # fused: one 3x3 conv with bias per block (fvcore does not count biases), no block norm
    assert counts == {
        "conv": pixels * (2 * (2 * C * C) + 3 * 9 * C * C),
        "batch_norm": pixels * 4 * C,
    }


def test_aifi_flops_by_hand():
    batch, tokens, ffn = 2, 6, 32
    layer = AIFILayer(embed_dim=C, num_heads=2, ffn_dim=ffn).eval()
    pos = torch.randn(tokens, C)
    counts = _flops(layer, (torch.randn(batch, tokens, C), pos))
    # projections q, k, v, out (n * C * C each) and the FFN (2 * n * C * F)
    assert counts["linear"] == batch * (4 * tokens * C * C + 2 * tokens * C * ffn)
    # query . key and weights @ value over all heads: 2 * n * n * C
    assert counts["scaled_dot_product_attention"] == batch * 2 * tokens * tokens * C
    assert counts["layer_norm"] == batch * 2 * 5 * tokens * C  # fvcore: 5 per element


def test_encoder_flops_are_counted():
    encoder = _encoder(num_levels=2, num_blocks=1).eval()
    features = helpers.make_features(((4, 4), (2, 2)), channels=C, batch=1)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, tokens):
            return self.encoder(replace(features, tokens=tokens), {}).memory

    counts = _flops(Wrapper(), (features.tokens,))
    # AIFI on the 2x2 level, no further attention; the fusion of 2 levels of 4x4 and 2x2 cells
    assert counts["scaled_dot_product_attention"] == 2 * 4 * 4 * C
    fine, coarse = 16, 4
    lateral = coarse * C * C
    csp = 2 * 2 * C * C + 10 * C * C  # per pixel, one RepVGG block
    downsample = coarse * 9 * C * C
    assert counts["conv"] == lateral + fine * csp + downsample + coarse * csp
    assert counts["upsample_nearest2d"] == fine * C


# --- the encoder on flattened features ------------------------------------------------------


def test_encoder_shapes_gradients_and_updated_tokens():
    encoder = _encoder().train()
    features = helpers.make_features(ODD_SHAPES, channels=C, image_sizes=[(56, 72), (30, 40)])
    features.tokens.requires_grad_(True)
    out = encoder(features, {})
    assert out.memory.shape == features.tokens.shape and torch.isfinite(out.memory).all()
    out.memory.square().sum().backward()
    assert torch.isfinite(features.tokens.grad).all()
    missing = [name for name, p in encoder.named_parameters() if p.grad is None]
    assert not missing and all(p.grad.abs().sum() > 0 for p in encoder.parameters())
    # AIFI on the 2x3 level, the top-down pass on all 69 tokens, the bottom-up on levels 1, 2
    assert encoder.num_layers == out.num_layers == 3
    valid = (~features.padding_mask).to(torch.int64)
    starts = features.level_starts
    counts = out.tokens_updated(features.padding_mask).tolist()
    assert counts == [
        valid[:, starts[2] :].sum(1).tolist(),
        valid.sum(1).tolist(),
        valid[:, starts[1] :].sum(1).tolist(),
    ]
    assert counts[0] == [6, 4] and counts[1][0] == 63 + 20 + 6


def test_aifi_only_on_its_level_and_configurable():
    encoder = _encoder(aifi_levels=(0, -1), num_aifi_layers=2)
    assert encoder.aifi_levels == [0, 2] and encoder.num_layers == 2 * 2 + 2
    seen = []
    for layers in encoder.aifi:
        for layer in layers:
            layer.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    features = helpers.make_features(ODD_SHAPES, channels=C)
    encoder(features, {})
    assert seen == [63, 63, 6, 6]
    assert _encoder(num_aifi_layers=0).num_layers == 2


def test_masked_padding_makes_an_image_independent_of_its_batch():
    # image 0 is 24 x 40 pixels in a 56 x 72 batch: valid cells 3x5, 2x3, 1x2
    image_shapes = ((3, 5), (2, 3), (1, 2))
    batched = helpers.make_features(
        ODD_SHAPES, channels=C, image_sizes=[(24, 40), (56, 72)], dtype=torch.float64
    )
    alone = helpers.make_features(image_shapes, channels=C, batch=1, dtype=torch.float64)
    level_tokens = []
    for tokens, (height, width), (h, w) in zip(
        batched.split_levels(batched.tokens[:1]), batched.level_shapes, image_shapes
    ):
        level_tokens.append(tokens.view(1, height, width, C)[:, :h, :w].reshape(1, h * w, C))
    alone = replace(alone, tokens=torch.cat(level_tokens, dim=1))
    valid_in_batch = ~batched.padding_mask[0]
    assert int(valid_in_batch.sum()) == alone.tokens.shape[1]

    def image_output(encoder, features, index=0):
        return encoder(features, {}).memory[index]

    outputs = {}
    for padding in ("masked", "visible"):
        encoder = _encoder(padding=padding, position_layout="row_major").double()
        _randomize_batch_norms(encoder)
        encoder.eval()
        with torch.no_grad():
            outputs[padding] = (
                image_output(encoder, batched)[valid_in_batch],
                image_output(encoder, alone),
            )
    in_batch, by_itself = outputs["masked"]
    torch.testing.assert_close(in_batch, by_itself, rtol=0, atol=1e-12)
    # the reference's padding: the image's tokens see the padded ones
    in_batch, by_itself = outputs["visible"]
    assert (in_batch - by_itself).abs().max() > 1e-3


def test_bfloat16_features():
    encoder = _encoder().to(torch.bfloat16).eval()
    features = helpers.make_features(ODD_SHAPES, channels=C, dtype=torch.bfloat16)
    out = encoder(features, {})
    assert out.memory.dtype == torch.bfloat16 and torch.isfinite(out.memory).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_levels": 1}, "num_levels >= 2, got 1"),
        ({"aifi_levels": (3,)}, r"aifi_levels \[3\]"),
        ({"aifi_levels": (2, -1)}, r"aifi_levels \[2, -1\] must be distinct"),
        ({"padding": "zeros"}, "'zeros'"),
        ({"position_layout": "xy"}, "'xy'"),
        ({"embed_dim": 18, "num_heads": 2}, "multiple of 4, got 18"),
        ({"activation": "tanh"}, "'tanh'"),
    ],
)
def test_constructor_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _encoder(**kwargs)


def test_level_shapes_must_halve():
    encoder = _encoder()
    features = helpers.make_features(((8, 8), (4, 4), (3, 2)), channels=C)
    with pytest.raises(ValueError, match=r"\(4, 4\), \(3, 2\)"):
        encoder(features, {})
    with pytest.raises(ValueError, match="num_levels=3"):
        encoder(helpers.make_features(((4, 4), (2, 2)), channels=C), {})


def _upsample(x, like):
    """Nearest x2, cropped to ``like``'s size."""
    x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    return x[:, :, : like.shape[-2], : like.shape[-1]]


def test_fusion_wiring_follows_rt_detr():
    torch.manual_seed(0)
    fusion = CrossScaleFusion(channels=C, num_levels=3, num_blocks=1).eval()
    seen = {}
    for name, module in fusion.named_children():
        for index, child in enumerate(module):
            key = f"{name}.{index}"
            child.register_forward_hook(
                lambda m, args, out, key=key: seen.update({key: (args[0], out)})
            )
    maps = [torch.randn(2, C, h, w) for h, w in ODD_SHAPES]
    outputs = fusion(maps)

    def inputs(key):
        return seen[key][0]

    def output(key):
        return seen[key][1]

    # top-down: lateral conv of the coarser result, upsampled, then [upsampled, finer]
    torch.testing.assert_close(inputs("lateral_convs.0"), maps[2])
    up = _upsample(output("lateral_convs.0"), maps[1])
    torch.testing.assert_close(inputs("top_down_blocks.0"), torch.cat([up, maps[1]], 1))
    torch.testing.assert_close(inputs("lateral_convs.1"), output("top_down_blocks.0"))
    up = _upsample(output("lateral_convs.1"), maps[0])
    torch.testing.assert_close(inputs("top_down_blocks.1"), torch.cat([up, maps[0]], 1))
    # bottom-up: [downsampled finer output, coarser top-down output (the lateral conv's)]
    torch.testing.assert_close(inputs("downsample_convs.0"), output("top_down_blocks.1"))
    expected = torch.cat([output("downsample_convs.0"), output("lateral_convs.1")], 1)
    torch.testing.assert_close(inputs("bottom_up_blocks.0"), expected)
    torch.testing.assert_close(inputs("downsample_convs.1"), output("bottom_up_blocks.0"))
    expected = torch.cat([output("downsample_convs.1"), output("lateral_convs.0")], 1)
    torch.testing.assert_close(inputs("bottom_up_blocks.1"), expected)
    expected = [output(key) for key in ("top_down_blocks.1", "bottom_up_blocks.0")]
    expected.append(output("bottom_up_blocks.1"))
    assert [o.shape for o in outputs] == [m.shape for m in maps]
    for actual, wanted in zip(outputs, expected):
        torch.testing.assert_close(actual, wanted)


def test_r50_encoder_parameter_count_by_hand():
    # RT-DETR R50: hidden 256, AIFI 8 heads / FFN 1024, 3 RepVGG blocks per CSP layer
    c, ffn = 256, 1024
    batch_norm = 2 * c  # weight + bias
    aifi = (3 * c * c + 3 * c) + (c * c + c) + (c * ffn + ffn) + (ffn * c + c) + 2 * 2 * c
    conv_bn_1x1, conv_bn_3x3 = c * c + batch_norm, 9 * c * c + batch_norm
    csp = 2 * (2 * c * c + batch_norm) + 3 * (conv_bn_3x3 + conv_bn_1x1)
    fusion = 2 * conv_bn_1x1 + 2 * conv_bn_3x3 + 4 * csp  # lateral, downsample, 4 CSP layers
    assert (aifi, csp, fusion) == (789_760, 2_232_320, 10_242_048)
    encoder = HybridEncoder()
    assert sum(p.numel() for p in encoder.parameters()) == aifi + fusion == 11_031_808
