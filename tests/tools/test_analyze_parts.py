"""The parts of focus_detr.tools.analyze on hand-made cases and the tiny models."""

import math

import helpers
import pytest
import torch
from detectron2.config import LazyConfig
from detectron2.utils.analysis import FlopCountAnalysis

from focus_detr.analysis import (
    TokenStatistics,
    collect_token_statistics,
    count_flops,
    count_parameters,
    measure_latency,
    measure_peak_memory,
)
from focus_detr.analysis.evaluation import first_items
from focus_detr.analysis.models import (
    MODEL_PARTS,
    AnalysisError,
    encoder_class,
    has_keep_ratio,
    resolve_name,
)
from focus_detr.analysis.report import to_json
from focus_detr.analysis.tokens import (
    fit_size_ranges,
    foreground_size_ranges,
    foreground_token_mask,
)
from focus_detr.layers.flop_count import ALL_FLOP_HANDLES
from focus_detr.modeling import EncoderOutput, compute_foreground_targets

pytestmark = pytest.mark.usefixtures("single_thread")

# Two images, levels (2, 2) and (1, 1) at strides 8 and 16 (a padded 16x16 input). Token
# centres: 0 (4, 4), 1 (12, 4), 2 (4, 12), 3 (12, 12) on level 0 and 4 (8, 8) on level 1.
LEVEL_SHAPES = ((2, 2), (1, 1))
STRIDES = (8, 16)
RANGES = ((-1.0, 16.0), (16.0, math.inf))
PADDING = torch.tensor([[False] * 5, [False, False, False, True, False]])
# Image 0: box x 0..10, y 0..16 contains tokens 0 (max distance 12) and 2 (12), not 1 and 3
# (x = 12 is outside); token 4 (8, 8) is inside with max distance 8, outside level 1's range.
# Image 1: the whole 16x16 box holds tokens 0, 1, 2 (max distance 12) and 3 (padded); token 4
# has max distance 8: not level 1's.
BOXES = [torch.tensor([[0.0, 0.0, 10.0, 16.0]]), torch.tensor([[0.0, 0.0, 16.0, 16.0]])]
FOREGROUND = torch.tensor([[1, 0, 1, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)


def _hand_encoder_output():
    """
    Layer 1 updates image 0's tokens {0, 1} and image 1's token {1} (its slot for 3 is
    invalid); layer 2 every valid token (None); layer 3 image 0's {4, 2} and image 1's {0, 2}
    (valid: not padded).
    """
    return EncoderOutput(
        memory=torch.zeros(2, 5, 4),
        layer_indices=[torch.tensor([[0, 1], [1, 3]]), None, torch.tensor([[4, 2], [0, 2]])],
        layer_valid=[torch.tensor([[True, True], [True, False]]), None, None],
    )


def test_foreground_tokens_of_the_hand_case():
    mask = foreground_token_mask(BOXES, LEVEL_SHAPES, STRIDES, PADDING, RANGES)
    assert torch.equal(mask, FOREGROUND)


def test_token_quality_equals_the_hand_computation():
    statistics = TokenStatistics()
    statistics.ranges = list(RANGES)
    statistics.add(_hand_encoder_output(), PADDING, FOREGROUND)
    quality = statistics.quality_summary()
    # 5 foreground tokens; layer 1 updates token 0 of image 0 and token 1 of image 1 (2 / 5),
    # layer 2 all (5 / 5), layer 3 token 2 of image 0 and tokens 0, 2 of image 1 (3 / 5)
    assert quality["foreground_tokens"] == 5
    assert quality["foreground_tokens_per_image"] == 2.5
    assert quality["foreground_share_per_layer"] == pytest.approx([0.4, 1.0, 0.6])
    assert quality["ranges"] == ["(-1, 16]", "(16, inf]"]
    tokens = statistics.tokens_summary()
    # updated: layer 1 (2, 1), layer 2 (5, 4), layer 3 (2, 2) of valid (5, 4)
    assert tokens["valid_tokens"] == 4.5
    assert tokens["updated_per_layer"] == pytest.approx([1.5, 4.5, 2.0])
    shares = [(2 / 5 + 1 / 4) / 2, 1.0, (2 / 5 + 2 / 4) / 2]
    assert tokens["updated_share_per_layer"] == pytest.approx(shares)


def test_token_quality_pools_images_and_handles_no_foreground():
    statistics = TokenStatistics()
    statistics.add(_hand_encoder_output(), PADDING, torch.zeros_like(FOREGROUND))
    assert statistics.quality_summary()["foreground_share_per_layer"] is None
    statistics.add(_hand_encoder_output(), PADDING, FOREGROUND)
    assert statistics.quality_summary()["foreground_share_per_layer"] == pytest.approx(
        [0.4, 1.0, 0.6]
    )
    assert TokenStatistics().quality_summary() is None


@pytest.mark.parametrize("encoder", ["focus", "sparse", "lite", "hybrid"])
def test_token_statistics_of_a_model_equal_encoder_output(encoder, tiny_batched_inputs):
    model = helpers.build_tiny_model(encoder=encoder).eval()
    statistics = collect_token_statistics(model, tiny_batched_inputs)
    expected, foreground_total, covered = [], 0, 0
    ranges = foreground_size_ranges(model.encoder, len(model.strides))
    with torch.no_grad():
        for item in tiny_batched_inputs:
            _, details = model.inference([{"image": item["image"]}], return_details=True)
            padding = details.features.padding_mask
            expected.append(details.encoder.tokens_updated(padding)[:, 0].double())
            boxes = item["instances"].gt_boxes.tensor
            targets = (
                compute_foreground_targets(
                    [boxes], details.features.level_shapes, details.features.strides, ranges
                ).bool()
                & ~padding
            )
            foreground_total += int(targets.sum())
            covered += torch.stack(
                [
                    (details.encoder.updated_mask(layer, padding) & targets).sum()
                    for layer in range(details.encoder.num_layers)
                ]
            )
    tokens = statistics.tokens_summary()
    assert tokens["updated_per_layer"] == pytest.approx(torch.stack(expected).mean(0).tolist())
    quality = statistics.quality_summary()
    assert quality["foreground_tokens"] == foreground_total > 0
    assert quality["foreground_share_per_layer"] == pytest.approx(
        (covered.double() / foreground_total).tolist()
    )


def test_size_ranges_fitted_to_fewer_levels():
    four = [(-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, math.inf)]
    assert fit_size_ranges(four, 4) == four
    assert fit_size_ranges(four, 3) == [(-1.0, 64.0), (64.0, 128.0), (128.0, math.inf)]
    assert fit_size_ranges(four[:3], 2) == [(-1.0, 64.0), (64.0, 256.0)]
    with pytest.raises(ValueError, match="cannot define the foreground tokens of 5 levels"):
        fit_size_ranges(four, 5)


def test_focus_uses_its_own_foreground_ranges():
    model = helpers.build_tiny_model(encoder="focus")
    model.encoder.foreground_loss.ranges = [(-1.0, 10.0), (10.0, 20.0), (20.0, 40.0)] + [
        (40.0, math.inf)
    ]
    assert foreground_size_ranges(model.encoder, 4)[0] == (-1.0, 10.0)
    dense = helpers.build_tiny_model(encoder="dense")
    assert foreground_size_ranges(dense.encoder, 4)[0] == (-1.0, 64.0)


def test_latency_times_the_encoder_inside_each_inference():
    model = helpers.build_tiny_model(encoder="dense").eval()
    inputs = [{"image": helpers.make_image(64, 80)}, {"image": helpers.make_image(64, 64)}]
    latency = measure_latency(model, inputs, warmup=1, iters=2)
    assert len(latency["model_ms_all"]) == len(latency["encoder_ms_all"]) == 4
    assert all(0 < e < m for e, m in zip(latency["encoder_ms_all"], latency["model_ms_all"]))
    assert 0 < latency["encoder_ms"] < latency["model_ms"] and latency["forwards"] == 4
    # the hooks are gone
    assert not model.encoder._forward_hooks and not model.encoder._forward_pre_hooks
    with pytest.raises(ValueError, match="iters"):
        measure_latency(model, inputs, warmup=0, iters=0)


def test_parameters_per_part_add_up():
    model = helpers.build_tiny_model(encoder="sparse")
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    for part in MODEL_PARTS:
        assert counts[part] == sum(p.numel() for p in getattr(model, part).parameters())
    assert counts["other"] == model.level_embed.numel() + sum(
        p.numel() for p in model.denoising.parameters()
    )


def test_flops_of_the_shared_heads_count_for_the_encoder_that_calls_them():
    model = helpers.build_tiny_model(encoder="focus").eval()
    image = {"image": helpers.make_image(96, 128)}
    caller = count_flops(model, image).parts
    assert sum(caller[part] for part in (*MODEL_PARTS, "other")) == caller["total"]
    assert all(caller[part] > 0 for part in MODEL_PARTS) and caller["other"] >= 0
    with torch.no_grad():
        owner = FlopCountAnalysis(model, [image]).set_op_handle(**ALL_FLOP_HANDLES)
        owner.ancestor_mode("owner").unsupported_ops_warnings(False)
        by_module = owner.uncalled_modules_warnings(False).by_module()
    assert by_module[""] == caller["total"]
    moved = caller["encoder"] - by_module["model.encoder"]
    # the selector's input projection and the category scores: counted for the encoder
    assert moved > 0
    assert by_module["model.query_selection"] - caller["query_selection"] == moved


def test_hybrid_flops_by_hand_convolutions_under_encoder_projection_under_neck():
    # tiny hybrid model: C = 32, ResNet-18 res3-res5 (128, 256, 512 channels), AIFI FFN 64,
    # 2 RepVGG blocks per CSP layer; a 128x160 image gives levels 16x20, 8x10, 4x5
    model = helpers.build_tiny_model(encoder="hybrid").eval()
    flops = count_flops(model, {"image": helpers.make_image(128, 160)}).parts
    c, ffn, blocks = 32, 64, 2
    p3, p4, p5 = 16 * 20, 8 * 10, 4 * 5
    # fvcore: conv / linear = multiply-adds, batch norm (eval) 2 and layer norm 5 per element
    neck = (128 * p3 + 256 * p4 + 512 * p5) * c + 2 * c * (p3 + p4 + p5)
    assert flops["neck"] == neck
    # AIFI on the 4x5 level: q, k, v, out projections, the FFN, attention, 2 layer norms
    aifi = 4 * p5 * c * c + 2 * p5 * c * ffn + 2 * p5 * p5 * c + 2 * 5 * p5 * c

    def csp(pixels):  # 2 1x1 branches 2C -> C, blocks of 3x3 + 1x1; a batch norm after each
        return (2 * 2 + 10 * blocks) * c * c * pixels + (2 + 2 * blocks) * 2 * c * pixels

    def conv_bn(kernel, pixels):
        return kernel * kernel * c * c * pixels + 2 * c * pixels

    top_down = conv_bn(1, p5) + csp(p4) + conv_bn(1, p4) + csp(p3) + c * (p4 + p3)  # + upsample
    bottom_up = conv_bn(3, p4) + csp(p4) + conv_bn(3, p5) + csp(p5)
    assert flops["encoder"] == aifi + top_down + bottom_up
    # no position embedding is computed, no level embedding counted
    assert flops["other"] == 0
    parameters = count_parameters(model)
    assert parameters["other"] == sum(p.numel() for p in model.denoising.parameters())


@pytest.mark.parametrize(
    "config, keep_ratio",
    [("sparse_detr_demo_shapes.py", True), ("focus_detr_demo_shapes.py", True)]
    + [("dino_demo_shapes.py", False), ("lite_detr_demo_shapes.py", False)]
    + [("rtdetr_hybrid_demo_shapes.py", False)],
)
def test_encoder_class_of_a_config(config, keep_ratio):
    cfg = LazyConfig.load(str(helpers.CONFIG_DIR / config))
    assert has_keep_ratio(encoder_class(cfg)) is keep_ratio


def test_baseline_names():
    assert resolve_name("dino", ["focus_r50", "dino_r50"]) == "dino_r50"
    assert resolve_name("dino", ["dino", "dino_r50"]) == "dino"
    with pytest.raises(AnalysisError, match="several"):
        resolve_name("d", ["dino_a", "dino_b"])
    with pytest.raises(AnalysisError, match="none"):
        resolve_name("lite", ["focus", "dino"])


def test_first_items_and_json_cleaning():
    assert first_items(range(5), 2) == [0, 1]
    with pytest.raises(ValueError, match="count"):
        first_items([1], 0)
    assert to_json({"a": (1.0, float("nan")), "b": {"c": float("inf")}}) == {
        "a": [1.0, None],
        "b": {"c": None},
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_latency_and_peak_memory():
    model = helpers.build_tiny_model(encoder="focus").eval().to("cuda")
    inputs = [{"image": helpers.make_image(96, 128)}]
    latency = measure_latency(model, inputs, warmup=1, iters=2)
    assert all(0 < e < m for e, m in zip(latency["encoder_ms_all"], latency["model_ms_all"]))
    assert measure_peak_memory(model, inputs) > 0
