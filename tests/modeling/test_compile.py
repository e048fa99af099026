"""
torch.compile: the encoder and the decoder of every demo-size model compile into one graph each
(``fullgraph=True``), and the compiled model gives the detections of the eager one.
"""

from typing import Dict, List

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from helpers import CONFIG_DIR, build_tiny_model, make_batched_inputs, make_image

pytestmark = pytest.mark.usefixtures("single_thread")

DEMO_CONFIGS = ("dino", "focus_detr", "sparse_detr", "lite_detr", "rtdetr_hybrid")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _assert_same_outputs(expected, actual, **tolerance):
    for name in ("memory", "class_logits", "boxes"):
        if hasattr(expected, name):
            torch.testing.assert_close(getattr(actual, name), getattr(expected, name), **tolerance)


@pytest.mark.parametrize("name", DEMO_CONFIGS + ("lite_detr_key_aware",))
def test_encoder_and_decoder_compile_without_graph_breaks(name):
    torch.manual_seed(0)
    key_aware = name.endswith("_key_aware")
    cfg = LazyConfig.load(str(CONFIG_DIR / f"{name.replace('_key_aware', '')}_demo_shapes.py"))
    if key_aware:  # Lite DETR's paper model: key-aware encoder and decoder cross-attention
        cfg.model.encoder.key_aware = cfg.model.decoder.key_aware = True
    model = instantiate(cfg.model).eval()
    inputs = [{"image": make_image(160, 192)}, {"image": make_image(128, 192, seed=1)}]
    with torch.no_grad():
        features = model.flatten_features(model.preprocess_image(inputs))
        available = model.query_selection.shared_heads()
        heads = {name: available[name] for name in model.encoder.shared_heads}
        encoded = model.encoder(features, heads)
        selection = model.query_selection(encoded.memory, features)
        decoder_args = (selection.queries, selection.reference_boxes, encoded.memory, features)
        decoded = model.decoder(*decoder_args)
        # fullgraph=True raises at the first graph break (a read of a tensor, an unsupported
        # call); the "eager" backend runs the captured graph as it is
        compiled_encoder = torch.compile(model.encoder, fullgraph=True, backend="eager")
        compiled_decoder = torch.compile(model.decoder, fullgraph=True, backend="eager")
        _assert_same_outputs(encoded, compiled_encoder(features, heads), rtol=0, atol=0)
        _assert_same_outputs(decoded, compiled_decoder(*decoder_args), rtol=0, atol=0)


@pytest.mark.parametrize("padded_batches", ["reference", "per_image"])
def test_focus_encoder_compiles_on_a_padded_batch(padded_batches):
    """Both padded-batch behaviours in one graph: budgets, fill, top-k per layer, candidates."""
    cfg = LazyConfig.load(str(CONFIG_DIR / "focus_detr_demo_shapes.py"))
    cfg.model.encoder.padded_batches = padded_batches
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    inputs = [{"image": make_image(160, 192)}, {"image": make_image(96, 128, seed=1)}]
    with torch.no_grad():
        features = model.flatten_features(model.preprocess_image(inputs))
        assert features.padding_mask[1].any()
        heads = {
            name: model.query_selection.shared_heads()[name]
            for name in ("memory_projection", "class_head")
        }
        encoded = model.encoder(features, heads)
        compiled = torch.compile(model.encoder, fullgraph=True, backend="eager")
        _assert_same_outputs(encoded, compiled(features, heads), rtol=0, atol=0)


def _detections(outputs: List[Dict]) -> List[Dict[str, torch.Tensor]]:
    return [
        {
            "boxes": output["instances"].pred_boxes.tensor,
            "scores": output["instances"].scores,
            "classes": output["instances"].pred_classes,
        }
        for output in outputs
    ]


def _assert_same_detections(expected, actual, *, box_atol: float, score_atol: float):
    """The same detections per image, matched by class and box (near-equal scores may swap)."""
    assert len(expected) == len(actual)
    for eager, compiled in zip(expected, actual):
        assert len(eager["scores"]) == len(compiled["scores"])
        torch.testing.assert_close(compiled["scores"], eager["scores"], rtol=0, atol=score_atol)
        for box, score, label in zip(eager["boxes"], eager["scores"], eager["classes"]):
            same_class = compiled["classes"] == label
            distance = (compiled["boxes"] - box).abs().amax(dim=1)
            score_gap = (compiled["scores"] - score).abs()
            match = same_class & (distance <= box_atol) & (score_gap <= score_atol)
            assert match.any(), f"no compiled detection matches {label}, {box}, {score}"


@pytest.mark.parametrize("encoder", ["focus", "sparse", "dense", "lite", "hybrid"])
def test_compiled_model_gives_the_eager_detections(encoder):
    model = build_tiny_model(encoder=encoder).eval()
    inputs = make_batched_inputs()
    with torch.no_grad():
        eager = _detections(model(inputs))
        # aot_eager: the graphs of dynamo and AOTAutograd, run by eager kernels (fast to build)
        compiled = _detections(torch.compile(model, backend="aot_eager")(inputs))
    _assert_same_detections(eager, compiled, box_atol=1e-4, score_atol=1e-6)


@pytest.mark.slow
def test_inductor_compiled_model_gives_the_eager_detections():
    """The default backend (generated C++ kernels): float32 rounding differs, detections not."""
    model = build_tiny_model(encoder="focus").eval()
    inputs = make_batched_inputs()
    with torch.no_grad():
        eager = _detections(model(inputs))
        compiled = _detections(torch.compile(model)(inputs))
    # boxes are in pixels of 400x500 originals
    _assert_same_detections(eager, compiled, box_atol=1e-2, score_atol=1e-5)


@pytest.mark.slow
def test_training_step_under_compile():
    """Graph breaks where training reads back (ground truth checks, the matcher), same losses."""
    results = []
    for compiled in (False, True):
        model = build_tiny_model(encoder="focus").train()
        runner = torch.compile(model, backend="aot_eager") if compiled else model
        torch.manual_seed(5)  # the denoising noise
        losses = runner(make_batched_inputs())
        sum(losses.values()).backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        results.append((losses, grads))
    (eager_losses, eager_grads), (losses, grads) = results
    assert losses.keys() == eager_losses.keys() and grads.keys() == eager_grads.keys()
    for name in losses:
        torch.testing.assert_close(losses[name], eager_losses[name])
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-4)
