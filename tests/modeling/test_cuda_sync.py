"""
On a GPU, inference never waits for the device: from the images on the GPU to the detection
tensors, nothing synchronises (``torch.cuda.set_sync_debug_mode("error")`` turns any
synchronising call into an error). Only detectron2's ``detector_postprocess``, which drops empty
boxes (a data-dependent size), reads the device back afterwards.
"""

import contextlib

import pytest
import torch
from detectron2.config import instantiate
from helpers import make_batched_inputs, tiny_model_config

from focus_detr.layers.ms_deform_attn_op import compiled_kernel_available
from focus_detr.modeling.detection_targets import select_detections

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@contextlib.contextmanager
def no_synchronisation():
    """Every synchronising CUDA call raises inside the block."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@requires_cuda
@pytest.mark.parametrize(
    "encoder", ["focus", "sparse", "dense", "lite", "lite_key_aware", "hybrid"]
)
def test_inference_does_not_synchronise(encoder):
    if not compiled_kernel_available("cuda"):
        # the op's PyTorch fallback reads the level shapes itself (its schema has no ints)
        pytest.skip("focus_detr._C has no CUDA kernels in this build")
    cfg = tiny_model_config(encoder=encoder)
    torch.manual_seed(0)
    model = instantiate(cfg).cuda().eval()
    inputs = make_batched_inputs()
    for per_image in inputs:
        per_image["image"] = per_image["image"].cuda()
    with torch.no_grad():
        # the whole inference once (detector_postprocess included), which also sets up the
        # libraries' handles; then the part that must not wait for the device
        results = model(inputs)
        torch.cuda.synchronize()
        with no_synchronisation():
            images = model.preprocess_image(inputs)
            details = model.predict(images)
            boxes, scores, classes = select_detections(
                details.decoder.class_logits[-1],
                details.decoder.boxes[-1],
                images.image_sizes,
                model.num_select,
            )
    assert torch.isfinite(details.decoder.boxes).all()
    assert torch.isfinite(boxes).all() and classes.dtype == torch.int64
    assert scores.shape == (len(inputs), model.num_select)
    assert len(results) == len(inputs)


@requires_cuda
def test_the_guard_catches_a_synchronisation():
    values = torch.arange(4, device="cuda")
    with pytest.raises(RuntimeError, match="synchroniz"):
        with no_synchronisation():
            values.sum().item()
