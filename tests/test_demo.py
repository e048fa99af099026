"""Tests of the demo: token maps, the predictor's capture, the pictures and the command line."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import instantiate
from PIL import Image

from focus_detr.data import register_synthetic_shapes
from focus_detr.demo import (
    DemoInputError,
    FocusDETRPredictor,
    dataset_images,
    dataset_metadata,
    find_images,
    foreground_maps,
    kept_token_maps,
    level_grids,
    load_config,
    run_demo,
    split_levels,
)
from focus_detr.demo.__main__ import main
from focus_detr.demo.inputs import output_names
from focus_detr.modeling import DenseEncoder

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(REPO_ROOT, "configs", "focus_detr_demo_shapes.py")
DATASET_PREFIX = "focus_detr_demo_test_shapes"
TINY_MODEL = [
    "model.hidden_dim=32",
    "model.neck.num_groups=8",
    "model.encoder.num_layers=2",
    "model.encoder.layer_keep_factors=[1.0,0.6]",
    "model.encoder.ffn_dim=64",
    "model.encoder.topk_sa=16",
    "model.decoder.num_layers=1",
    "model.decoder.feedforward_dim=64",
    "model.query_selection.num_queries=12",
    "model.num_select=12",
    "model.denoising.dn_number=4",
    f"dataloader.test.dataset.names={DATASET_PREFIX}_val",
    # a long side of 160 instead of 320 keeps the tests fast
    "dataloader.test.mapper.augmentations.0.short_edge_length=160",
    "dataloader.test.mapper.augmentations.0.max_size=160",
]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    names = register_synthetic_shapes(
        str(root), num_train=1, num_val=3, seed=0, min_size=64, max_size=112,
        name_prefix=DATASET_PREFIX,
    )  # fmt: skip
    return names["val"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_dataset):
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = instantiate(load_config(CONFIG_FILE, TINY_MODEL).model)
    DetectionCheckpointer(model, str(folder)).save("model")
    return str(folder / "model.pth")


@pytest.fixture(scope="module")
def predictor(weights):
    return FocusDETRPredictor(load_config(CONFIG_FILE, TINY_MODEL), weights=weights, device="cpu")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two odd-sized RGB images (one landscape, one portrait) and a text file to ignore."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, (height, width) in (("wide", (97, 150)), ("tall", (131, 90))):
        pixels = rng.integers(0, 80, size=(height, width, 3), dtype=np.uint8)
        pixels[height // 4 : height // 2, width // 3 : width // 2] = (230, 40, 40)
        Image.fromarray(pixels).save(folder / f"{name}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


# ---------------------------------------------------------------- token maps


def _two_level_layout():
    # padded input 16 x 24, image 10 x 13: level 0 (4, 6) at stride 4 keeps ceil(10/4)=3 rows
    # and ceil(13/4)=4 columns; level 1 (2, 3) at stride 8 keeps ceil(10/8)=2 and ceil(13/8)=2
    spatial_shapes = torch.tensor([[4, 6], [2, 3]])
    return level_grids(spatial_shapes, image_size=(10, 13), padded_size=(16, 24))


def test_level_grids_crop_the_padding():
    first, second = _two_level_layout()
    assert (first.start, first.height, first.width) == (0, 4, 6)
    assert (first.valid_height, first.valid_width) == (3, 4)
    assert (first.stride_y, first.stride_x) == (4.0, 4.0)
    assert (second.start, second.height, second.width) == (24, 2, 3)
    assert (second.valid_height, second.valid_width) == (2, 2)
    assert (second.stride_y, second.stride_x) == (8.0, 8.0)


def test_split_levels_and_foreground_maps_put_tokens_in_their_cells():
    grids = _two_level_layout()
    values = torch.arange(30.0)
    level0, level1 = split_levels(values, grids)
    assert torch.equal(level0, torch.arange(24.0).view(4, 6)[:3, :4])
    assert torch.equal(level1, torch.tensor([[24.0, 25.0], [27.0, 28.0]]))
    logits = torch.linspace(-3, 3, 30)
    maps = foreground_maps(logits, grids)
    assert [tuple(m.shape) for m in maps] == [(3, 4), (2, 2)]
    assert torch.allclose(maps[1][1, 1], torch.sigmoid(logits[24 + 4]))
    with pytest.raises(ValueError, match=r"\(30,\)"):
        split_levels(torch.zeros(29), grids)


def test_kept_token_maps_mark_kept_cells_only():
    grids = _two_level_layout()
    # 7 = level 0 (1, 1); 28 = level 1 (1, 1); 23 = level 0 (3, 5) and 5 = (0, 5) are padding;
    # 0 was gathered but not written back (beyond the budget)
    indices = torch.tensor([7, 28, 23, 5, 0])
    valid = torch.tensor([True, True, True, True, False])
    level0, level1 = kept_token_maps(indices, valid, grids)
    expected0 = torch.zeros(3, 4, dtype=torch.bool)
    expected0[1, 1] = True
    expected1 = torch.zeros(2, 2, dtype=torch.bool)
    expected1[1, 1] = True
    assert torch.equal(level0, expected0) and torch.equal(level1, expected1)
    with pytest.raises(ValueError, match="30"):
        kept_token_maps(torch.tensor([30]), torch.tensor([True]), grids)


# ---------------------------------------------------------------- predictor and pictures


def test_predictor_captures_the_encoder_layout(predictor, image_folder):
    image = np.asarray(Image.open(image_folder / "wide.png"))
    prediction = predictor(image)
    tokens = prediction.tokens
    assert prediction.image_rgb.shape == image.shape
    assert prediction.instances.image_size == image.shape[:2]
    # the test mapper (with its overrides) resized the long side to 160
    assert max(tokens.image_size) == 160 and tokens.strides == [8, 16, 32, 64]
    grids = level_grids(
        tokens.spatial_shapes, image_size=tokens.image_size, padded_size=tokens.padded_size
    )
    maps = foreground_maps(tokens.foreground_logits, grids)
    for grid, stride, fmap in zip(grids, tokens.strides, maps):
        assert fmap.shape == (grid.valid_height, grid.valid_width)
        assert grid.valid_height == math.ceil(tokens.image_size[0] / stride)
        assert grid.valid_width == math.ceil(tokens.image_size[1] / stride)
    # the cropped maps hold exactly the tokens the model treats as valid ...
    assert sum(m.numel() for m in maps) == int((~tokens.padding_mask).sum())
    # ... and every token a layer kept
    assert len(tokens.layer_indices) == 2
    for indices, valid in zip(tokens.layer_indices, tokens.layer_valid):
        kept = kept_token_maps(indices, valid, grids)
        assert sum(int(k.sum()) for k in kept) == int(valid.sum()) > 0


def _assert_png(path, *, min_size=64, max_size=1400):
    assert os.path.isfile(path), path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min_size <= min(image.size) and max(image.size) <= max_size, image.size


def test_run_demo_on_val_images(predictor, tiny_dataset, tmp_path):
    files = dataset_images(tiny_dataset, 2)
    assert len(files) == 2
    messages = []
    written = run_demo(
        predictor,
        files,
        output_dir=str(tmp_path / "out"),
        metadata=dataset_metadata(tiny_dataset),
        score_threshold=0.0,
        log=messages.append,
    )
    stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
    assert written == [
        str(tmp_path / "out" / f"{stem}_{kind}.png")
        for stem in stems
        for kind in ("predictions", "tokens")
    ]
    assert messages == written
    for path in written:
        _assert_png(path)
    with Image.open(written[1]) as tokens_picture:
        assert 900 <= tokens_picture.size[0] <= 1200  # 12 in at 90 dpi


def _dense_like(encoder):
    """A dense encoder (no token selector) of the same sizes as ``encoder``."""
    attention = encoder.layers[0].deformable_attn
    return DenseEncoder(
        embed_dim=encoder.embed_dim,
        num_layers=1,
        num_heads=attention.num_heads,
        num_levels=encoder.num_levels,
        num_points=attention.num_points,
        ffn_dim=16,
    ).eval()


def test_run_demo_without_selector_writes_predictions_only(predictor, image_folder, tmp_path):
    original = predictor.model.encoder
    predictor.model.encoder = _dense_like(original)
    try:
        messages = []
        written = run_demo(
            predictor,
            [str(image_folder / "tall.png")],
            output_dir=str(tmp_path),
            log=messages.append,
        )
    finally:
        predictor.model.encoder = original
    assert written == [str(tmp_path / "tall_predictions.png")]
    _assert_png(written[0])
    assert any("no token selector" in message for message in messages)


def test_run_demo_never_writes_over_an_input_image(predictor, image_folder, tmp_path):
    """Inputs x.png and x_predictions.png in the output folder: x's picture would replace one."""
    inputs = [tmp_path / "x.png", tmp_path / "x_predictions.png"]
    for path in inputs:
        path.write_bytes((image_folder / "wide.png").read_bytes())
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with pytest.raises(DemoInputError) as error:
        run_demo(predictor, [str(p) for p in inputs], output_dir=str(tmp_path), log=None)
    assert f"The output {inputs[1]} is the input {inputs[1]}" in str(error.value)
    assert "choose another --output folder" in str(error.value)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_an_image_the_model_cannot_take_is_named(predictor, image_folder, tmp_path, monkeypatch):
    # a backbone padding to a fixed square (ViT-style) smaller than the resized image (160)
    monkeypatch.setattr(
        type(predictor.model.backbone),
        "padding_constraints",
        property(lambda self: {"square_size": 128}),
    )
    with pytest.raises(DemoInputError) as error:
        run_demo(predictor, [str(image_folder / "wide.png")], output_dir=str(tmp_path), log=None)
    message = str(error.value)
    assert f"the model failed on image {image_folder / 'wide.png'}: ValueError" in message
    assert "square_size=128" in message


def test_the_demo_reads_16_bit_images_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 50).round().astype(np.uint16), (40, 1))
    path = tmp_path / "gray16.png"
    Image.fromarray(ramp).save(path)
    seen = []

    class Recorder:
        input_format = "RGB"

        def __call__(self, image):
            seen.append(image)
            raise RuntimeError("recorded")

    with pytest.raises(DemoInputError, match=f"failed on image {path}: RuntimeError: recorded"):
        run_demo(Recorder(), [str(path)], output_dir=str(tmp_path / "out"), log=None)
    expected = ((ramp.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    assert seen[0].shape == (40, 50, 3)
    np.testing.assert_array_equal(seen[0][:, :, 0], expected)


# ---------------------------------------------------------------- inputs and command line


def test_inputs(image_folder, tmp_path):
    found = find_images([str(image_folder)])
    assert [os.path.basename(f) for f in found] == ["tall.png", "wide.png"]
    assert output_names(["a/x.png", "b/x.png", "x.jpg"]) == ["x", "x_1", "x_2"]
    with pytest.raises(DemoInputError, match="missing.png"):
        find_images([str(tmp_path / "missing.png")])
    with pytest.raises(DemoInputError, match=str(tmp_path)):
        find_images([str(tmp_path)])  # a folder without images
    with pytest.raises(DemoInputError, match="not registered"):
        dataset_images("no_such_dataset", 1)


def test_main_reports_bad_inputs_and_missing_weights(weights, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    base = ["--config-file", CONFIG_FILE, "--weights", weights, "--output", str(tmp_path)]
    assert main(base + ["--input", str(broken), "--"] + TINY_MODEL) != 0
    assert f"Cannot read image {broken}" in capsys.readouterr().err
    assert main(base) != 0
    assert "--val-images" in capsys.readouterr().err
    missing = tmp_path / "nowhere" / "model_final.pth"
    assert main(["--config-file", CONFIG_FILE, "--weights", str(missing), "--val-images", "1"]) != 0
    assert str(missing) in capsys.readouterr().err


def _run_cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    return subprocess.run(
        [sys.executable, "-m", "focus_detr.demo", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_writes_pictures_and_applies_overrides(weights, image_folder, tmp_path):
    # no --output: the pictures go to <train.output_dir>/pictures, set by a trailing override
    result = _run_cli(
        "--config-file", CONFIG_FILE, "--weights", weights, "--input", str(image_folder),
        "--score-threshold", "0.01", "--device", "cpu",
        *TINY_MODEL, f"train.output_dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected = [
        str(tmp_path / "pictures" / f"{stem}_{kind}.png")
        for stem in ("tall", "wide")
        for kind in ("predictions", "tokens")
    ]
    assert result.stdout.split() == expected
    for path in expected:
        _assert_png(path)
