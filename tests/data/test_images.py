"""
Every image is read correctly or rejected with its name (focus_detr.data.images and the dataset
mapper): 16-bit, 32-bit and float images are scaled to 8 bits (detectron2's reader clips them to
white), unsupported modes are rejected naming the file and the mode, in training, evaluation and
the preflight; a damaged file names itself, also from a loader worker of the test split.
"""

import shutil

import numpy as np
import pytest
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from helpers import tiny_train_config
from PIL import Image

from focus_detr.data import DatasetMapper, ImageReadError, SampleLoadError, read_image
from focus_detr.engine import PreflightError
from focus_detr.engine.preflight import check_images

# a horizontal ramp over the whole 16-bit range
RAMP16 = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (8, 1))
SCALED = ((RAMP16.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)


def _save(tmp_path, name, pixels, mode=None):
    path = tmp_path / name
    image = Image.fromarray(pixels) if mode is None else Image.fromarray(pixels, mode=mode)
    image.save(path)
    return str(path)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    path = _save(tmp_path, "gray16.png", RAMP16)
    assert Image.open(path).mode == "I;16"
    rgb = read_image(path, format="RGB")
    assert rgb.shape == (8, 64, 3) and rgb.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(rgb[:, :, channel], SCALED)
    np.testing.assert_array_equal(read_image(path, format="BGR"), rgb)
    np.testing.assert_array_equal(read_image(path, format="L")[:, :, 0], SCALED)
    assert rgb.min() == 0 and rgb.max() == 255 and len(np.unique(rgb)) == 64


def test_32_bit_integer_and_float_images_are_scaled_or_rejected_by_name(tmp_path):
    path = _save(tmp_path, "int32.tif", RAMP16.astype(np.int32))
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(read_image(path)[:, :, 1], SCALED)
    beyond = _save(tmp_path, "int32_beyond.tif", RAMP16.astype(np.int32) * 2)
    with pytest.raises(ImageReadError, match=r"int32_beyond.tif has mode 'I' with values in"):
        read_image(beyond)

    unit = _save(tmp_path, "float.tif", (RAMP16 / 65535).astype(np.float32))
    assert Image.open(unit).mode == "F"
    expected = np.rint(RAMP16 / 65535 * 255).astype(np.uint8)
    np.testing.assert_array_equal(read_image(unit)[:, :, 0], expected)
    large = _save(tmp_path, "float_large.tif", RAMP16.astype(np.float32))
    with pytest.raises(ImageReadError, match=r"float_large.tif has mode 'F' .* \[0, 1\]"):
        read_image(large)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "1", "L", "YCbCr"])
def test_8_bit_modes_are_converted_as_pillow_converts_them(tmp_path, mode):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8))
    image = rgb.convert(mode)
    path = tmp_path / f"image_{mode}.tif"
    image.save(path)
    assert Image.open(path).mode == mode
    np.testing.assert_array_equal(read_image(str(path)), np.asarray(image.convert("RGB")))


def test_the_exif_orientation_is_applied_as_detectron2_applies_it(tmp_path):
    from detectron2.data.detection_utils import read_image as detectron2_read_image

    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[0, :5] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90 degrees
    path = str(tmp_path / "rotated.png")
    image.save(path, exif=exif.tobytes())
    rotated = read_image(path)
    assert rotated.shape == (20, 10, 3)
    np.testing.assert_array_equal(rotated, detectron2_read_image(path, format="RGB"))


def test_unsupported_modes_and_damaged_files_are_named(tmp_path):
    path = tmp_path / "lab.tif"
    Image.new("LAB", (4, 4)).save(path)
    with pytest.raises(ImageReadError, match=rf"{path}: its mode 'LAB' is not one of"):
        read_image(str(path))
    with pytest.raises(PreflightError, match=rf"Image {path} of the train .*mode 'LAB'"):
        check_images([{"file_name": str(path)}], "train")

    truncated = tmp_path / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(
        truncated
    )
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=f"Cannot read image {truncated}: OSError"):
        read_image(str(truncated))


@pytest.mark.parametrize("is_train", [True, False])
def test_the_mapper_reads_with_the_same_reader_and_names_the_file(tmp_path, is_train):
    mapper = DatasetMapper(is_train=is_train, augmentations=[], image_format="RGB")
    path = _save(tmp_path, "gray16.png", RAMP16)
    record = {"file_name": path, "height": 8, "width": 64, "image_id": 0, "annotations": []}
    mapped = mapper(record)
    np.testing.assert_array_equal(mapped["image"][0].numpy(), SCALED)
    with pytest.raises(SampleLoadError, match=f"Failed to load image {tmp_path / 'none.png'}"):
        mapper(dict(record, file_name=str(tmp_path / "none.png")))
    # detectron2's own check of the size the dataset declares
    with pytest.raises(SampleLoadError, match="gray16.png: SizeMismatchError"):
        mapper(dict(record, width=65))
    # an augmentation that fails (a 1-pixel strip resized to a long side of 64 has no rows)
    thin = _save(tmp_path, "strip.png", np.zeros((1, 400, 3), np.uint8))
    resizing = DatasetMapper(
        is_train=is_train,
        augmentations=[T.ResizeShortestEdge(64, max_size=64)],
        image_format="RGB",
    )
    with pytest.raises(SampleLoadError, match=f"Failed to load image {thin}: ValueError: height"):
        resizing({"file_name": thin, "height": 1, "width": 400, "annotations": []})


def test_a_truncated_image_of_the_test_split_is_named_from_a_loader_worker(shapes, tmp_path):
    """The test loader of the configs: detectron2's, with focus_detr's mapper."""
    name = f"{shapes.names['val']}_truncated"
    records = DatasetCatalog.get(shapes.names["val"])
    broken = tmp_path / "broken_val.png"
    shutil.copy(records[1]["file_name"], broken)
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 3])  # header intact: the preflight passes it
    check_images([{"file_name": str(broken)}], "test")
    damaged = [dict(records[0])] + [dict(records[1], file_name=str(broken))]
    DatasetCatalog.register(name, lambda: damaged)
    MetadataCatalog.get(name).set(
        thing_classes=MetadataCatalog.get(shapes.names["val"]).thing_classes
    )
    try:
        cfg = tiny_train_config(tmp_path, shapes.names)
        cfg.dataloader.test.dataset.names = name
        cfg.dataloader.test.num_workers = 1
        loader = instantiate(cfg.dataloader.test)
        with pytest.raises(Exception, match="broken_val.png") as error:
            list(loader)
        assert "image file is truncated" in str(error.value)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
