"""
Integration tests of the two-stage DETR meta-architecture with every encoder: a tiny model on
tiny, odd-sized, empty and degenerate inputs, in training and inference.
"""

import pytest
import torch
from detectron2.config import instantiate
from helpers import make_batched_inputs, tiny_model_config

from focus_detr.modeling import FocusDETR

pytestmark = pytest.mark.usefixtures("single_thread")

# The loss terms of one training step: last layer, the auxiliary layer (2 decoder layers), the
# two-stage encoder output, denoising for both layers; then each encoder's own: Focus's
# foreground token selector, Sparse DETR's saliency loss and its auxiliary head after encoder
# layer 0 (of 2).
DETECTOR_LOSSES = {
    f"loss_{term}{suffix}"
    for term in ("class", "bbox", "giou")
    for suffix in ("", "_0", "_enc", "_dn", "_dn_0")
}
ENCODER_LOSSES = {
    "focus": {"loss_foreground"},
    "dense": set(),
    "sparse": {"loss_saliency"} | {f"loss_{t}_enc_aux_0" for t in ("class", "bbox", "giou")},
    "lite": set(),
    "lite_key_aware": set(),
    "hybrid": set(),
}


def _build(kind: str, seed: int = 0):
    cfg = tiny_model_config(encoder=kind)
    torch.manual_seed(seed)
    return instantiate(cfg)


@pytest.fixture(params=list(ENCODER_LOSSES))
def kind(request):
    return request.param


@pytest.fixture
def tiny_model(kind):
    return _build(kind).train()


ENCODER_CLASS_LOSSES = {
    "FocusEncoder": ENCODER_LOSSES["focus"],
    "DenseEncoder": ENCODER_LOSSES["dense"],
    "SparseEncoder": ENCODER_LOSSES["sparse"],
    "LiteEncoder": ENCODER_LOSSES["lite"],
    "HybridEncoder": ENCODER_LOSSES["hybrid"],
}


def _check_losses(losses, model):
    expected = DETECTOR_LOSSES | ENCODER_CLASS_LOSSES[type(model.encoder).__name__]
    assert set(losses) == expected, sorted(set(losses) ^ expected)
    for name, value in losses.items():
        assert value.dim() == 0, f"{name} has shape {tuple(value.shape)}"
        assert torch.isfinite(value), f"{name} = {value}"


def _check_gradients(model):
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    not_finite = [
        n for n, p in model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()
    ]
    assert not not_finite, f"non-finite gradients: {not_finite}"


def _train_step(model, inputs):
    model.train()
    model.zero_grad(set_to_none=True)
    losses = model(inputs)
    _check_losses(losses, model)
    sum(losses.values()).backward()
    _check_gradients(model)
    return losses


def _check_predictions(outputs, inputs, num_classes=3, num_select=10):
    assert len(outputs) == len(inputs)
    for output, per_image in zip(outputs, inputs):
        instances = output["instances"]
        height = per_image.get("height", per_image["image"].shape[1])
        width = per_image.get("width", per_image["image"].shape[2])
        assert instances.image_size == (height, width)
        boxes = instances.pred_boxes.tensor
        assert 0 < len(instances) <= num_select
        assert torch.isfinite(boxes).all()
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= width).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= height).all()
        assert (boxes[:, 2:] >= boxes[:, :2]).all()
        assert ((instances.scores >= 0) & (instances.scores <= 1)).all()
        assert ((instances.pred_classes >= 0) & (instances.pred_classes < num_classes)).all()


def test_train_odd_sizes_with_an_empty_image(tiny_model, tiny_batched_inputs):
    # 200x250 and 200x249 in one batch: the second image is padded; it has no boxes.
    assert len(tiny_batched_inputs[1]["instances"]) == 0
    _train_step(tiny_model, tiny_batched_inputs)


def test_all_images_empty_gives_finite_losses(tiny_model):
    inputs = make_batched_inputs(boxes=[[], []])
    tiny_model.train()
    losses = tiny_model(inputs)
    _check_losses(losses, tiny_model)
    # no box, nothing matched: the box losses are exactly zero, the class losses are not
    assert losses["loss_bbox"] == 0 and losses["loss_giou_dn"] == 0
    assert losses["loss_class"] > 0
    sum(losses.values()).backward()


def test_every_parameter_gets_a_gradient_without_boxes(tiny_model):
    _train_step(tiny_model, make_batched_inputs(boxes=[[], []]))


def test_eval_odd_sizes_in_original_coordinates(kind, tiny_batched_inputs):
    model = _build(kind).eval()
    with torch.no_grad():
        outputs = model(tiny_batched_inputs)
    _check_predictions(outputs, tiny_batched_inputs)
    # height/width are twice the input size: some boxes must reach past the input size
    assert outputs[0]["instances"].pred_boxes.tensor[:, 2].max() > 250

    # The same input at original size = input size: identical predictions at half the scale.
    same_size = [
        {"image": x["image"], "height": x["image"].shape[1], "width": x["image"].shape[2]}
        for x in tiny_batched_inputs
    ]
    with torch.no_grad():
        unscaled = model(same_size)
    _check_predictions(unscaled, same_size)
    for scaled, plain in zip(outputs, unscaled):
        scaled, plain = scaled["instances"], plain["instances"]
        torch.testing.assert_close(scaled.scores, plain.scores)
        assert torch.equal(scaled.pred_classes, plain.pred_classes)
        torch.testing.assert_close(scaled.pred_boxes.tensor, 2 * plain.pred_boxes.tensor)


def test_eval_without_original_size_and_without_instances(kind):
    model = _build(kind).eval()
    inputs = [{"image": x["image"]} for x in make_batched_inputs()]
    with torch.no_grad():
        outputs = model(inputs)
    _check_predictions(outputs, inputs)


@pytest.mark.parametrize(
    "sizes,boxes",
    [
        (((64, 64), (32, 200)), [[[4, 6, 40, 50]], [[10, 2, 150, 30], [0, 0, 20, 20]]]),
        (((32, 200), (64, 64)), [[], [[30, 10, 60, 64]]]),
        # smaller than the largest stride (64), alone and next to a normal image
        (((16, 16),), [[[2, 3, 12, 14]]]),
        (((16, 16), (96, 80)), [[[2, 3, 12, 14]], [[5, 5, 60, 70]]]),
        # thin strips and a single pixel
        (((8, 400), (400, 8)), [[[10, 1, 200, 7]], [[1, 10, 7, 300]]]),
        (((1, 1),), [[]]),
        (((1, 1), (48, 64)), [[[0, 0, 1, 1]], [[4, 4, 40, 30]]]),
    ],
)
def test_small_images_train_and_infer(tiny_model, sizes, boxes):
    # Images smaller than topk_sa, the query count and the largest stride; a 32-pixel side gives
    # a 1-row stride-32 level and a 1-row stride-64 level, a 1-pixel image one cell per level.
    inputs = make_batched_inputs(sizes, boxes)
    _train_step(tiny_model, inputs)
    tiny_model.eval()
    with torch.no_grad():
        outputs = tiny_model(inputs)
    _check_predictions(outputs, inputs)


def test_degenerate_boxes_do_not_give_nan(tiny_model):
    # zero width, zero height, and a box entirely outside the image next to a normal box
    boxes = [
        [[30, 20, 30, 120], [10, 60, 150, 60], [300, 10, 320, 50], [20, 20, 120, 150]],
        [[50, 50, 50, 90]],
    ]
    _train_step(tiny_model, make_batched_inputs(boxes=boxes))


def test_training_is_reproducible_with_the_same_seed(kind, tiny_batched_inputs):
    # Denoising noise is the only randomness of a step: same seed, same losses.
    model = _build(kind).train()
    torch.manual_seed(3)
    first = model(tiny_batched_inputs)
    torch.manual_seed(3)
    second = model(tiny_batched_inputs)
    for name in first:
        torch.testing.assert_close(first[name], second[name], msg=name)


def _parts(cfg):
    """The instantiated constructor arguments of a FocusDETR config node."""
    return {key: instantiate(value) for key, value in cfg.items() if key != "_target_"}


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_select": 0}, "num_select"),
        ({"input_format": "YUV"}, "input_format"),
        ({"pixel_std": [1.0, 0.0, 1.0]}, "pixel_std"),
        ({"num_select": 21}, "num_select=21 .* num_queries=20"),
    ],
)
def test_bad_values_raise(overrides, match):
    parts = _parts(tiny_model_config())
    parts.update(overrides)
    with pytest.raises(ValueError, match=match):
        FocusDETR(**parts)


@pytest.mark.parametrize(
    "module,key,value",
    [
        ("encoder", "num_levels", 3),  # the neck gives res3-res5 + 1 extra level = 4 levels
        ("decoder", "num_levels", 5),
        ("neck", "num_extra_levels", 0),  # 3 levels from the neck, 4 in encoder and decoder
        ("neck", "in_features", ["res4", "res5"]),
    ],
)
def test_levels_inconsistent_with_the_neck_raise(module, key, value):
    cfg = tiny_model_config()
    cfg.encoder.foreground_ranges = None  # one default range per level, whatever the count
    cfg[module][key] = value
    with pytest.raises(ValueError, match="num_levels"):
        FocusDETR(**_parts(cfg))


def test_tiny_batches_are_padded_to_two_coarse_cells():
    model = _build("focus").eval()
    images = model.preprocess_image(make_batched_inputs(((16, 16), (1, 40)), [[], []]))
    min_size = 2 * max(model.strides)
    assert tuple(images.tensor.shape[-2:]) == (min_size, min_size)
    assert list(images.image_sizes) == [(16, 16), (1, 40)]
    large = model.preprocess_image(make_batched_inputs(((200, 250),), [[]]))
    assert tuple(large.tensor.shape[-2:]) == (200, 250)


def test_bfloat16_autocast_step_on_tiny_images(tiny_model):
    # a 77x20 image next to a 1x1 one gave NaN in oneDNN's bfloat16 convolutions of one-cell
    # wide feature maps before the batch was padded to two coarse cells
    inputs = make_batched_inputs(((77, 20), (1, 1)), [[[1, 1, 10, 50]], [[0, 0, 1, 1]]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = tiny_model(inputs)
    _check_losses(losses, tiny_model)
    sum(losses.values()).backward()
    _check_gradients(tiny_model)


def test_channels_last_gives_the_same_losses_and_gradients(tiny_batched_inputs):
    results = []
    for channels_last in (False, True):
        cfg = tiny_model_config()
        cfg.channels_last = channels_last
        torch.manual_seed(0)
        model = instantiate(cfg).train()
        assert (
            model.backbone.res2[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
            == channels_last
        )
        torch.manual_seed(1)
        losses = model(tiny_batched_inputs)
        sum(losses.values()).backward()
        results.append((losses, model.neck.projections[0][0].weight.grad.clone()))
    (plain, plain_grad), (last, last_grad) = results
    for name in plain:
        torch.testing.assert_close(last[name], plain[name], rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(last_grad, plain_grad, rtol=1e-3, atol=1e-5)


def test_inference_padding_masks_option():
    """
    ``inference_padding_masks=False`` is detrex's inference: no padding mask in eval mode (the
    padded batch is every image's extent), masks from the image sizes in training; the same
    detections as the default on a batch of one image (at least two coarsest cells per side, so
    that it is not padded).
    """
    inputs = make_batched_inputs(((160, 192), (136, 144)), [[], []])
    models = {}
    for masks in (True, False):
        cfg = tiny_model_config()
        cfg.inference_padding_masks = masks
        torch.manual_seed(0)
        models[masks] = instantiate(cfg).eval()
    with torch.no_grad():
        details = {m: models[m].inference(inputs, return_details=True)[1] for m in models}
        alone = {masks: models[masks](inputs[1:]) for masks in models}
    assert details[True].features.padding_mask[1].any()
    assert not details[False].features.padding_mask.any()
    assert torch.equal(details[False].features.valid_ratios, torch.ones(2, 4, 2))
    boxes = {masks: details[masks].decoder.boxes[-1][1] for masks in models}
    assert not torch.allclose(boxes[False], boxes[True])
    for name in ("pred_boxes", "scores", "pred_classes"):
        expected = alone[True][0]["instances"].get(name)
        actual = alone[False][0]["instances"].get(name)
        expected = getattr(expected, "tensor", expected)
        torch.testing.assert_close(getattr(actual, "tensor", actual), expected, rtol=0, atol=0)
    model = models[False].train()
    features = model.flatten_features(model.preprocess_image(inputs))
    assert features.padding_mask[1].any() and not features.padding_mask[0].any()
