"""
``python -m focus_detr.tools.export`` on the demo config (random weights): the ONNX model
(onnxruntime) at 128x160 and the torch.export program at 64x96 (which the model pads to 128x128
inside the program, so that the traced token budgets differ from the eager ones) give PyTorch's
detections; the ONNX translation of the deformable attention alone against the PyTorch
reference; bad input.
"""

import math

import helpers
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate

from focus_detr.export import (
    DetectorExportWrapper,
    compare_detections,
    count_msda_nodes,
    export_onnx_module,
    export_torch,
    run_onnx,
    run_torch_export,
)
from focus_detr.layers import (
    MultiScaleDeformableAttention,
    msda_backend,
    multi_scale_deformable_attention_reference,
)
from focus_detr.tools.export import main

HEIGHT, WIDTH = 128, 160
SMALL_HEIGHT, SMALL_WIDTH = 64, 96  # below the demo model's minimum input of 128x128
BOX_TOLERANCE, SCORE_TOLERANCE = 0.05, 1e-4


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo model with seeded random weights, saved as a train_net.py checkpoint."""
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(3)
    model = instantiate(LazyConfig.load(str(helpers.DEMO_CONFIG)).model).eval()
    weights = str(folder / "random.pth")
    torch.save({"model": model.state_dict(), "iteration": 0}, weights)
    # a different seed, so that the checkpoint (not the seed) decides the exported weights
    torch.manual_seed(4)
    loaded = instantiate(LazyConfig.load(str(helpers.DEMO_CONFIG)).model).eval()
    DetectionCheckpointer(loaded).load(weights)
    return folder, weights, loaded


def _export(demo, fmt, suffix, capsys, height, width):
    folder, weights, _ = demo
    output = str(folder / f"demo{suffix}")
    argv = ["--config-file", str(helpers.DEMO_CONFIG), "--weights", weights, "--format", fmt]
    argv += ["--output", output, "--height", str(height), "--width", str(width)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{fmt} vs PyTorch on a random image: top 50:" in printed
    return output, printed


def _check_against_pytorch(model, outputs, height, width):
    """Run on an image other than the tool's own check image, compare as the issue asks."""
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(11)) * 255
    boxes, scores, classes = outputs(image)
    assert boxes.shape == (100, 4) and scores.shape == (100,) and classes.shape == (100,)
    assert boxes.dtype == np.float32 and scores.dtype == np.float32 and classes.dtype == np.int64
    with torch.no_grad():
        reference = model.inference([{"image": image}])[0]["instances"]
    comparison = compare_detections(
        reference.pred_boxes.tensor.numpy(),
        reference.scores.numpy(),
        reference.pred_classes.numpy(),
        boxes,
        scores,
        classes,
        top=50,
        score_tolerance=SCORE_TOLERANCE,
    )
    assert comparison.compared == 50
    assert comparison.within(BOX_TOLERANCE, SCORE_TOLERANCE), str(comparison)
    # the boxes lie in the image and the scores come best first, as in Instances
    assert (boxes[:, [0, 2]] >= 0).all() and (boxes[:, [0, 2]] <= width).all()
    assert (boxes[:, [1, 3]] >= 0).all() and (boxes[:, [1, 3]] <= height).all()
    assert (np.diff(scores) <= 0).all()


def test_torch_export_program(demo, capsys):
    path, printed = _export(demo, "torch-export", ".pt2", capsys, SMALL_HEIGHT, SMALL_WIDTH)
    model = demo[2]
    program = torch.export.load(path)
    # one node per deformable attention layer: 3 encoder + 3 decoder layers
    assert count_msda_nodes(program) == 6
    assert "6 focus_detr::ms_deform_attn nodes" in printed
    assert "the model pads the image to 128x128 inside the program" in printed
    _check_against_pytorch(
        model, lambda image: run_torch_export(path, image), SMALL_HEIGHT, SMALL_WIDTH
    )


def test_onnx_model(demo, capsys):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    path, printed = _export(demo, "onnx", ".onnx", capsys, HEIGHT, WIDTH)
    graph = onnx.load(path).graph
    assert [(i.name, [d.dim_value for d in i.type.tensor_type.shape.dim]) for i in graph.input] == [
        ("image", [3, HEIGHT, WIDTH])
    ]
    assert [o.name for o in graph.output] == ["boxes", "scores", "classes"]
    operators = {node.op_type for node in graph.node}
    domains = {node.domain for node in graph.node}
    assert "GridSample" in operators and domains <= {"", "ai.onnx"}
    _check_against_pytorch(demo[2], lambda image: run_onnx(path, image), HEIGHT, WIDTH)


def test_onnx_deformable_attention_matches_reference(tmp_path):
    """The translation alone, with samples outside their level and non-finite inputs."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    shapes = torch.tensor([[6, 5], [3, 3], [1, 2]])
    starts = torch.tensor([0, 30, 39])
    generator = torch.Generator().manual_seed(0)
    value = torch.randn(2, 41, 2, 4, generator=generator)
    locations = torch.rand(2, 7, 2, 3, 2, 2, generator=generator) * 1.6 - 0.3
    weights = torch.rand(2, 7, 2, 3, 2, generator=generator)
    locations[0, 1, 0, 0, 0] = torch.tensor([math.nan, 0.5])
    locations[1, 2, 1, 1, 1] = torch.tensor([math.inf, 0.5])
    weights[0, 3, 1, 2, 0] = math.inf  # the query's head becomes NaN if the sample is inside
    locations[0, 3, 1, 2, 0] = torch.tensor([0.5, 0.5])
    weights[1, 4, 0, 0, 1] = math.nan
    locations[1, 4, 0, 0, 1] = torch.tensor([5.0, 5.0])  # outside: the NaN weight is ignored

    class Attention(torch.nn.Module):
        def forward(self, value, locations, weights):
            return torch.ops.focus_detr.ms_deform_attn(value, shapes, starts, locations, weights)

    inputs = (value, locations, weights)
    path = str(tmp_path / "msda.onnx")
    export_onnx_module(
        Attention().eval(), inputs, path, input_names=["value", "locations", "weights"]
    )
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (output,) = session.run(
        None, {n: t.numpy() for n, t in zip(["value", "locations", "weights"], inputs)}
    )
    expected = multi_scale_deformable_attention_reference(value, shapes, starts, locations, weights)
    assert torch.isnan(expected[0, 3, 4:]).all() and not torch.isnan(expected[1, 4]).any()
    np.testing.assert_allclose(output, expected.numpy(), rtol=1e-5, atol=1e-6, equal_nan=True)


def test_compare_detections_tolerates_near_ties_only():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 2, 2]], dtype=np.float32)
    scores = np.array([0.9, 0.5, 0.49999], dtype=np.float32)
    classes = np.array([1, 2, 3])
    # the two near-tied detections swapped, one box without area appended
    swapped = compare_detections(
        boxes,
        scores,
        classes,
        np.concatenate([boxes[[0, 2, 1]], [[4, 4, 4, 9]]]),
        np.concatenate([scores[[0, 2, 1]], [0.95]]),
        np.concatenate([classes[[0, 2, 1]], [0]]),
    )
    assert swapped.unmatched == 0 and swapped.within(0.05, 1e-4)
    other_class = compare_detections(boxes, scores, classes, boxes, scores, np.array([0, 2, 3]))
    assert other_class.unmatched == 1 and not other_class.within(0.05, 1e-4)
    # a near-tie may swap, but not carry the other detection's box
    swapped_boxes = compare_detections(boxes, scores, classes, boxes, scores, classes[[0, 2, 1]])
    assert swapped_boxes.max_box_difference == 18 and not swapped_boxes.within(0.05, 1e-4)
    moved = compare_detections(boxes, scores, classes, boxes + [0, 0, 0.1, 0], scores, classes)
    assert moved.max_box_difference == pytest.approx(0.1) and not moved.within(0.05, 1e-4)


def test_wrapper_rejects_other_sizes(demo):
    wrapper = DetectorExportWrapper(demo[2], height=HEIGHT, width=WIDTH)
    with pytest.raises(ValueError, match=r"\(3, 128, 160\), got \(3, 160, 128\)"):
        wrapper(torch.zeros(3, WIDTH, HEIGHT))
    with pytest.raises(ValueError, match="height must be a positive int, got 0"):
        DetectorExportWrapper(demo[2], height=0, width=WIDTH)


def test_bad_command_lines(demo, tmp_path, capsys):
    base = ["--config-file", str(helpers.DEMO_CONFIG), "--height", "64", "--width", "64"]
    with pytest.raises(SystemExit) as exit_info:
        main(base + ["--format", "tflite", "--output", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err

    missing = str(tmp_path / "no_such_weights.pth")
    argv = base + ["--format", "onnx", "--output", str(tmp_path / "x.onnx"), "--weights", missing]
    assert main(argv) == 2
    assert f"weights file not found: {missing}" in capsys.readouterr().err

    argv = ["--config-file", str(tmp_path / "none.py"), "--format", "onnx", "--height", "64"]
    assert main(argv + ["--width", "64", "--output", str(tmp_path / "x.onnx")]) == 2
    assert f"config file not found: {tmp_path / 'none.py'}" in capsys.readouterr().err

    argv = base[:2] + ["--height", "-3", "--width", "64", "--format", "torch-export"]
    assert main(argv + ["--output", str(tmp_path / "x.pt2")]) == 2
    assert "--height must be positive, got -3" in capsys.readouterr().err

    argv = base + ["--format", "torch-export", "--output", str(tmp_path / "no" / "x.pt2")]
    assert main(argv) == 2
    assert f"{tmp_path / 'no'}" in capsys.readouterr().err


def test_the_output_never_replaces_the_weights_or_an_existing_file(demo, tmp_path, capsys):
    _, weights, _ = demo
    copy = tmp_path / "weights.pth"
    copy.write_bytes(open(weights, "rb").read())
    before = copy.read_bytes()
    base = ["--config-file", str(helpers.DEMO_CONFIG), "--height", "64", "--width", "64"]
    base += ["--format", "torch-export", "--no-verify", "--weights", str(copy), "--output"]
    assert main(base + [str(copy)]) == 2
    error = capsys.readouterr().err
    assert f"The output {copy} is the input {copy}" in error and "--overwrite" in error
    assert copy.read_bytes() == before
    existing = tmp_path / "existing.pt2"
    existing.write_bytes(b"someone's file")
    assert main(base + [str(existing)]) == 2
    assert f"The output {existing} exists" in capsys.readouterr().err
    assert existing.read_bytes() == b"someone's file"
    assert main(base + [str(existing), "--overwrite"]) == 0
    assert count_msda_nodes(torch.export.load(str(existing))) == 6


def test_weights_that_do_not_fit_are_refused(demo, tmp_path, capsys):
    _, weights, _ = demo
    state = torch.load(weights)["model"]
    head = "query_selection.class_head.weight"
    state[head] = state[head][:3]  # 3 classes instead of 6
    del state["decoder.norm.bias"]
    other = str(tmp_path / "other.pth")
    torch.save({"model": state}, other)
    corrupt = str(tmp_path / "corrupt.pth")
    with open(corrupt, "wb") as f:
        f.write(b"not a checkpoint")
    base = ["--config-file", str(helpers.DEMO_CONFIG), "--height", "64", "--width", "64"]
    base += ["--format", "torch-export", "--output", str(tmp_path / "x.pt2"), "--weights"]
    assert main(base + [other]) == 2
    error = capsys.readouterr().err
    assert f"{other} has no weights of the right shape for 2 tensors" in error
    assert head in error and "decoder.norm.bias" in error
    assert main(base + [corrupt]) == 2
    assert f"Cannot load checkpoint {corrupt}" in capsys.readouterr().err
    assert not (tmp_path / "x.pt2").exists()


def test_export_keeps_the_op_under_the_reference_backend(tmp_path):
    shapes, starts = torch.tensor([[4, 4], [2, 2]]), torch.tensor([0, 16])
    attention = MultiScaleDeformableAttention(embed_dim=8, num_heads=2, num_levels=2, num_points=2)
    value = torch.randn(1, 20, 8)

    class Attention(torch.nn.Module):
        def forward(self, query):
            points = torch.full((1, query.shape[1], 2, 2), 0.5)
            return attention(query, points, value, shapes, starts)

    query = torch.randn(1, 3, 8)
    with msda_backend("reference"):
        program = export_torch(Attention(), query, str(tmp_path / "attention.pt2"))
        expected = Attention()(query)
    assert count_msda_nodes(program) == 1
    loaded = torch.export.load(str(tmp_path / "attention.pt2")).module()
    torch.testing.assert_close(loaded(query), expected)
