"""Tests of the synthetic shapes dataset: determinism, COCO validity, cache and registration."""

import json
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image
from pycocotools.coco import COCO

from focus_detr.data import (
    CLASS_NAMES,
    ShapesConfig,
    ensure_synthetic_split,
    register_shapes,
    register_synthetic_shapes,
    synthetic_cache,
)
from focus_detr.data.shape_drawing import render_shape_mask
from focus_detr.data.synthetic import main, summarize_coco

# Small images keep every generation here well under a second.
TINY = ShapesConfig(seed=3, min_size=64, max_size=112)


def _generate(root, *, num_images=6, config=TINY, split="train"):
    return ensure_synthetic_split(str(root), split=split, num_images=num_images, config=config)


def _read_json(paths):
    with open(paths.json_file, "rb") as f:
        return f.read()


def _pixels(paths, coco):
    return [
        np.asarray(Image.open(os.path.join(paths.image_root, image["file_name"])))
        for image in coco["images"]
    ]


@pytest.fixture
def generation_counter(monkeypatch):
    """Counts calls of the generator made through the cache."""
    calls = []
    original = synthetic_cache.generate_split

    def counting(*args, **kwargs):
        calls.append(kwargs["split"])
        return original(*args, **kwargs)

    monkeypatch.setattr(synthetic_cache, "generate_split", counting)
    return calls


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    first = _generate(tmp_path / "a")
    second = _generate(tmp_path / "b")
    assert _read_json(first) == _read_json(second)
    coco = json.loads(_read_json(first))
    for pixels_a, pixels_b in zip(_pixels(first, coco), _pixels(second, coco)):
        assert pixels_a.dtype == np.uint8 and pixels_a.ndim == 3
        np.testing.assert_array_equal(pixels_a, pixels_b)

    other = _generate(tmp_path / "c", config=ShapesConfig(seed=4, min_size=64, max_size=112))
    assert _read_json(other) != _read_json(first)
    other_coco = json.loads(_read_json(other))
    assert any(
        a.shape != b.shape or not np.array_equal(a, b)
        for a, b in zip(_pixels(first, coco), _pixels(other, other_coco))
    )


def test_output_does_not_depend_on_the_number_of_writer_threads(tmp_path):
    from focus_detr.data.synthetic_shapes import generate_split

    outputs = {}
    for workers in (1, 3):
        image_dir = str(tmp_path / f"w{workers}")
        coco = generate_split(image_dir, split="train", num_images=7, config=TINY, workers=workers)
        pixels = [
            np.asarray(Image.open(os.path.join(image_dir, image["file_name"])))
            for image in coco["images"]
        ]
        outputs[workers] = (coco, pixels)
    assert outputs[1][0] == outputs[3][0]
    assert [image["id"] for image in outputs[3][0]["images"]] == list(range(1, 8))
    for a, b in zip(outputs[1][1], outputs[3][1]):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        generate_split(str(tmp_path / "w0"), split="train", num_images=1, config=TINY, workers=0)


def test_annotations_are_valid_coco(tmp_path):
    paths = _generate(tmp_path, num_images=70)
    api = COCO(paths.json_file)
    coco = json.loads(_read_json(paths))

    categories = {c["id"]: c["name"] for c in coco["categories"]}
    assert [categories[i] for i in sorted(categories)] == list(CLASS_NAMES)
    image_ids = [image["id"] for image in coco["images"]]
    annotation_ids = [a["id"] for a in coco["annotations"]]
    assert len(set(image_ids)) == len(image_ids) == 70
    assert len(set(annotation_ids)) == len(annotation_ids) > 0
    assert sorted(api.getImgIds()) == sorted(image_ids)

    images = {image["id"]: image for image in coco["images"]}
    for annotation in coco["annotations"]:
        image = images[annotation["image_id"]]
        x, y, w, h = annotation["bbox"]
        assert w >= 2 and h >= 2, annotation
        assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]
        assert annotation["category_id"] in categories
        assert annotation["iscrowd"] == 0 and 0 < annotation["area"] <= w * h

    for image in coco["images"][:5]:
        with Image.open(os.path.join(paths.image_root, image["file_name"])) as png:
            assert png.size == (image["width"], image["height"]) and png.mode == "RGB"

    summary = summarize_coco(coco, train_long_side=TINY.train_long_side)
    assert summary["num_empty_images"] >= 1  # round(0.03 * 70) = 2 images without objects
    assert sum(count > 0 for count in summary["scale_ranges"].values()) >= 3
    assert sum(count > 0 for count in summary["boxes_per_class"].values()) >= 5
    assert summary["image_size_range"][0] >= 64 and summary["image_size_range"][1] <= 112
    assert len({(image["width"], image["height"]) for image in coco["images"]}) > 10


def test_small_train_long_side_caps_object_sizes_at_the_image(tmp_path):
    # a training long side under 256 makes the largest scale range exceed the image
    config = ShapesConfig(seed=1, min_size=64, max_size=96, train_long_side=96)
    coco = json.loads(_read_json(_generate(tmp_path, num_images=12, config=config)))
    sizes = {image["id"]: (image["width"], image["height"]) for image in coco["images"]}
    assert coco["annotations"]
    for annotation in coco["annotations"]:
        x, y, w, h = annotation["bbox"]
        width, height = sizes[annotation["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= width and y + h <= height


def test_objects_overlap_but_never_vanish(tmp_path):
    coco = json.loads(_read_json(_generate(tmp_path, num_images=30)))
    boxes_per_image = {}
    for annotation in coco["annotations"]:
        boxes_per_image.setdefault(annotation["image_id"], []).append(annotation["bbox"])

    def intersects(a, b):
        return min(a[0] + a[2], b[0] + b[2]) > max(a[0], b[0]) and min(
            a[1] + a[3], b[1] + b[3]
        ) > max(a[1], b[1])

    overlapping = sum(
        intersects(a, b)
        for boxes in boxes_per_image.values()
        for i, a in enumerate(boxes)
        for b in boxes[i + 1 :]
    )
    assert overlapping > 0


@pytest.mark.parametrize("class_index", range(len(CLASS_NAMES)))
def test_shape_mask_fills_its_box(class_index):
    rng = np.random.default_rng(0)
    for width, height in ((3, 3), (17, 11), (40, 52)):
        mask = render_shape_mask(class_index, width, height, rng)
        assert mask.shape == (height, width)
        assert mask.any(axis=0).all() and mask.any(axis=1).all()


def test_cache_is_reused_and_regenerated_when_broken(tmp_path, generation_counter):
    paths = _generate(tmp_path)
    assert generation_counter == ["train"]
    original_json = _read_json(paths)
    image_file = os.path.join(paths.image_root, "000002.png")
    mtimes = {p: os.stat(p).st_mtime_ns for p in (paths.json_file, image_file)}

    _generate(tmp_path)
    assert generation_counter == ["train"]
    assert {p: os.stat(p).st_mtime_ns for p in mtimes} == mtimes

    os.remove(image_file)
    _generate(tmp_path)
    assert len(generation_counter) == 2 and os.path.isfile(image_file)
    assert _read_json(paths) == original_json

    with open(paths.json_file, "w") as f:
        f.write('{"images": [')
    _generate(tmp_path)
    assert len(generation_counter) == 3 and _read_json(paths) == original_json

    with open(paths.manifest_file, "w") as f:
        f.write("not json")
    _generate(tmp_path)
    assert len(generation_counter) == 4

    # Other parameters invalidate the cache; stale images of a larger split are removed.
    _generate(tmp_path, num_images=4)
    assert len(generation_counter) == 5
    assert sorted(os.listdir(paths.image_root)) == [f"{i:06d}.png" for i in range(4)]


def test_registration_is_lazy_and_loads_detectron2_dicts(tmp_path, generation_counter):
    root = str(tmp_path / "shapes")
    kwargs = dict(num_train=5, num_val=3, seed=1, min_size=64, max_size=96)
    names = register_synthetic_shapes(root, name_prefix="test_shapes", **kwargs)
    try:
        assert names == {"train": "test_shapes_train", "val": "test_shapes_val"}
        assert not os.path.exists(root)  # nothing generated by registering
        metadata = MetadataCatalog.get(names["val"])
        assert metadata.json_file == os.path.join(root, "annotations", "instances_val.json")
        assert metadata.image_root == os.path.join(root, "val")
        assert metadata.evaluator_type == "coco"
        assert metadata.thing_classes == list(CLASS_NAMES)

        # Registering again with the same arguments is a no-op, not an error.
        assert register_synthetic_shapes(root, name_prefix="test_shapes", **kwargs) == names

        dicts = DatasetCatalog.get(names["val"])
        assert generation_counter == ["val"] and os.path.isfile(metadata.json_file)
        assert len(dicts) == 3
        annotations = [a for record in dicts for a in record["annotations"]]
        assert annotations and all(a["bbox_mode"] == BoxMode.XYWH_ABS for a in annotations)
        assert all(0 <= a["category_id"] < len(CLASS_NAMES) for a in annotations)
        assert all(os.path.isfile(record["file_name"]) for record in dicts)
        assert len(DatasetCatalog.get(names["train"])) == 5

        # Other arguments replace the registration.
        register_synthetic_shapes(root, name_prefix="test_shapes", **{**kwargs, "num_val": 2})
        assert len(DatasetCatalog.get(names["val"])) == 2
    finally:
        for name in names.values():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
            register_shapes._REGISTERED.pop(name, None)


def test_default_registration_points_at_default_root():
    metadata = MetadataCatalog.get("focus_detr_shapes_train")
    assert metadata.json_file.endswith(
        os.path.join("focus_detr_shapes", "annotations", "instances_train.json")
    )
    assert "focus_detr_shapes_val" in DatasetCatalog.list()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_train": 0}, "num_train must be an integer >= 1, got 0"),
        ({"num_val": -2}, "num_val must be an integer >= 1, got -2"),
        ({"min_size": 300, "max_size": 200}, "min_size=300, max_size=200"),
        ({"min_size": 16}, "min_size must be >= 32, got 16"),
        ({"seed": -1}, "seed must be a non-negative integer, got -1"),
        ({"empty_fraction": 1.5}, "empty_fraction must be in [0, 1), got 1.5"),
    ],
)
def test_invalid_parameters_are_rejected(tmp_path, kwargs, message):
    with pytest.raises(ValueError) as error:
        register_synthetic_shapes(str(tmp_path), name_prefix="test_invalid", **kwargs)
    assert message in str(error.value)
    assert "test_invalid_train" not in DatasetCatalog.list()


def test_command_line_generates_and_summarises(tmp_path, capsys):
    args = ["--root", str(tmp_path), "--num-train", "4", "--num-val", "2"]
    assert main(args + ["--min-size", "64", "--max-size", "80", "--seed", "5"]) == 0
    output = capsys.readouterr().out
    assert "[train] 4 images" in output and "[val] 2 images" in output
    assert "boxes per class: circle" in output and "<=64:" in output
    assert os.path.isfile(os.path.join(tmp_path, "annotations", "instances_val.json"))
    assert main(["--root", str(tmp_path), "--num-train", "0"]) == 2
