"""
No forward waits for the device: the encoder, the query selection and the decoder read no tensor
back into Python at inference (counted on the CPU with :class:`HostReadCounter`, for every
encoder), and a training step reads back only in the matcher (scipy on the CPU) and in the
checks of the ground truth, which run on the data loader's CPU tensors.
"""

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from helpers import (
    CONFIG_DIR,
    build_tiny_model,
    make_batched_inputs,
    make_image,
    tiny_model_config,
)
from host_reads import HostReadCounter

from focus_detr.layers import MultiScaleDeformableAttention, multi_scale_deformable_attention

pytestmark = pytest.mark.usefixtures("single_thread")

DEMO_CONFIGS = ("dino", "focus_detr", "sparse_detr", "lite_detr", "rtdetr_hybrid")


def _demo_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LazyConfig.load(str(CONFIG_DIR / f"{name}_demo_shapes.py"))
    return instantiate(cfg.model).eval()


def _reads_per_part(model: torch.nn.Module, inputs) -> dict:
    """Host reads of the encoder, the query selection and the decoder at inference."""
    counts = {}
    with torch.no_grad():
        features = model.flatten_features(model.preprocess_image(inputs))
        with HostReadCounter() as counter:
            encoded = model.encode(features)
        counts["encoder"] = counter.summary()
        with HostReadCounter() as counter:
            selection = model.query_selection(encoded.memory, features)
        counts["query_selection"] = counter.summary()
        with HostReadCounter() as counter:
            decoded = model.decoder(
                selection.queries, selection.reference_boxes, encoded.memory, features
            )
        counts["decoder"] = counter.summary()
    assert torch.isfinite(decoded.boxes).all()
    return counts


@pytest.mark.parametrize("name", DEMO_CONFIGS)
def test_demo_models_read_nothing_back_at_inference(name):
    model = _demo_model(name)
    reads = _reads_per_part(model, [{"image": make_image(160, 192)}])
    assert reads == {"encoder": {}, "query_selection": {}, "decoder": {}}


@pytest.mark.parametrize(
    "encoder", ["focus", "sparse", "dense", "lite", "lite_key_aware", "hybrid"]
)
def test_batches_with_padding_read_nothing_back(encoder):
    # two images of different sizes: padding, per-image budgets
    model = build_tiny_model(encoder=encoder)
    reads = _reads_per_part(model.eval(), make_batched_inputs())
    assert reads == {"encoder": {}, "query_selection": {}, "decoder": {}}


@pytest.mark.parametrize("padded_batches", ["reference", "per_image"])
@pytest.mark.parametrize("inference_padding_masks", [True, False])
def test_focus_on_a_padded_batch_reads_nothing_back(padded_batches, inference_padding_masks):
    # the second image has padded tokens on every level: budgets of both rules, the fill
    cfg = tiny_model_config(encoder="focus")
    cfg.encoder.padded_batches = padded_batches
    cfg.inference_padding_masks = inference_padding_masks
    torch.manual_seed(0)
    model = instantiate(cfg).eval()
    inputs = make_batched_inputs(((160, 192), (96, 128)), [[], []])
    reads = _reads_per_part(model, inputs)
    assert reads == {"encoder": {}, "query_selection": {}, "decoder": {}}


def test_the_counter_sees_what_it_must():
    values = torch.arange(4.0)
    with HostReadCounter() as counter:
        values.tolist()
        values.sum().item()
        int(values[1])
        bool(values.any())
        values[values > 1]
        values.nonzero()
        torch.where(values > 1)
        values.numpy()
        values.cpu()
        # not reads: shapes, masks, indexing with integer tensors, device-side selection
        values.shape[0]
        values.masked_fill(values > 1, 0.0)
        values[torch.tensor([0, 2])]
        torch.where(values > 1, values, 0.0)
    names = [name for name, _ in counter.reads]
    expected = ["tolist", "item", "__int__", "__bool__", "__getitem__", "nonzero", "where"]
    assert names == expected + ["numpy", "cpu"]


@pytest.mark.parametrize("encoder", ["focus", "sparse", "dense", "lite", "hybrid"])
def test_training_reads_back_only_in_the_matcher_and_the_ground_truth(encoder):
    model = build_tiny_model(encoder=encoder).train()
    inputs = make_batched_inputs()
    with HostReadCounter() as counter:
        losses = model(inputs)
    assert losses and all(torch.isfinite(value) for value in losses.values())
    places = {location.rsplit(":", 1)[0] for _, location in counter.reads}
    # scipy's assignment needs the cost on the CPU; the ground truth is checked on the data
    # loader's CPU tensors before it is copied to the model's device
    assert places == {"modeling/matcher.py", "modeling/detection_targets.py"}
    ground_truth = [read for read in counter.reads if "detection_targets" in read[1]]
    assert all(x["instances"].gt_boxes.tensor.device.type == "cpu" for x in inputs)
    assert ground_truth, "the ground truth checks are counted (the counter works)"


def _attention_inputs(level_shapes=((4, 4), (2, 2))):
    torch.manual_seed(0)
    num_values = sum(h * w for h, w in level_shapes)
    value = torch.randn(1, num_values, 2, 4)
    locations = torch.rand(1, 3, 2, len(level_shapes), 2, 2)
    weights = torch.rand(1, 3, 2, len(level_shapes), 2)
    shapes = torch.tensor(level_shapes)
    starts = torch.tensor([0, level_shapes[0][0] * level_shapes[0][1]])
    return value, shapes, starts, locations, weights


def test_the_op_reads_the_level_shapes_only_when_not_told_them():
    value, shapes, starts, locations, weights = _attention_inputs()
    with HostReadCounter() as told:
        vouched = multi_scale_deformable_attention(
            value, shapes, starts, locations, weights, level_shapes=((4, 4), (2, 2))
        )
    with HostReadCounter() as untold:
        checked = multi_scale_deformable_attention(value, shapes, starts, locations, weights)
    assert told.count == 0 and untold.count == 2  # spatial_shapes and level_start_index
    torch.testing.assert_close(vouched, checked, rtol=0, atol=0)


def test_direct_callers_get_clear_errors_with_or_without_level_shapes():
    value, shapes, starts, locations, weights = _attention_inputs()
    # told shapes that do not cover value: checked on the Python ints
    with pytest.raises(ValueError, match=r"\[\(4, 4\), \(2, 3\)\] hold sum\(h \* w\) = 22"):
        multi_scale_deformable_attention(
            value, shapes, starts, locations, weights, level_shapes=((4, 4), (2, 3))
        )
    with pytest.raises(ValueError, match=r"level_shapes \[\(4, 4\)\] must hold 2 levels"):
        multi_scale_deformable_attention(
            value, shapes, starts, locations, weights, level_shapes=((4, 4),)
        )
    # not told: the tensors' contents are read and checked, as before
    with pytest.raises(ValueError, match=r"level_start_index \[0, 15\] is inconsistent"):
        multi_scale_deformable_attention(value, shapes, torch.tensor([0, 15]), locations, weights)
    module = MultiScaleDeformableAttention(embed_dim=8, num_heads=2, num_levels=2, num_points=2)
    query, points = torch.randn(1, 3, 8), torch.rand(1, 3, 2, 2)
    with pytest.raises(ValueError, match=r"hold sum\(h \* w\) = 20 values but value has Nv = 19"):
        module(query, points, torch.randn(1, 19, 8), shapes, starts)
