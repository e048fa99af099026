"""Bad input stops do_train before training starts (before the model is even built)."""

import itertools
import os
import shutil

import pytest
from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import default_argument_parser
from helpers import import_train_net, tiny_train_config

from focus_detr.engine import PreflightError

_count = itertools.count()

train_net = import_train_net()


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    def refuse(cfg):
        raise AssertionError("the pre-flight checks let a bad run build its model")

    monkeypatch.setattr(train_net, "build_model", refuse)


@pytest.fixture
def copy_of(shapes, tmp_path):
    """A copy of the tiny shapes dataset registered as COCO under a new name; returns
    ``(name, json_file, image_root)`` for the split ``"train"`` or ``"val"``."""
    root = tmp_path / "data"
    shutil.copytree(shapes.root, root)
    names = []

    def make(split="train", json_file=None):
        name = f"preflight_{os.getpid()}_{next(_count)}"
        json_file = json_file or str(root / "annotations" / f"instances_{split}.json")
        register_coco_instances(name, {}, json_file, str(root / split))
        names.append(name)
        return name, json_file, root / split

    yield make
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _train(tmp_path, shapes, train_name=None, val_name=None):
    cfg = tiny_train_config(tmp_path / "out", shapes.names)
    if train_name:
        cfg.dataloader.train.dataset.names = train_name
    if val_name:
        cfg.dataloader.test.dataset.names = val_name
    del cfg.dataloader.evaluator
    train_net.do_train(cfg)


def test_a_missing_image(shapes, tmp_path, copy_of):
    name, _, image_root = copy_of()
    victim = sorted(image_root.iterdir())[1]
    victim.unlink()
    with pytest.raises(PreflightError, match=f"1 of the 4 images of the train dataset.*{victim}"):
        _train(tmp_path, shapes, train_name=name)


def test_a_missing_image_of_the_test_dataset(shapes, tmp_path, copy_of):
    name, _, image_root = copy_of("val")
    victim = sorted(image_root.iterdir())[0]
    victim.unlink()
    with pytest.raises(PreflightError, match=f"test dataset do not exist: {victim}"):
        _train(tmp_path, shapes, val_name=name)


def test_a_file_that_is_not_an_image(shapes, tmp_path, copy_of):
    name, _, image_root = copy_of()
    victim = sorted(image_root.iterdir())[2]
    victim.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(PreflightError, match=f"Image {victim} .* cannot be read as an image"):
        _train(tmp_path, shapes, train_name=name)


def test_a_missing_annotation_file(shapes, tmp_path, copy_of):
    missing = str(tmp_path / "nowhere" / "instances.json")
    name, _, _ = copy_of(json_file=missing)
    with pytest.raises(PreflightError, match=f"train dataset {name} .*annotation file {missing}"):
        _train(tmp_path, shapes, train_name=name)


def test_a_malformed_annotation_file(shapes, tmp_path, copy_of):
    name, json_file, _ = copy_of()
    with open(json_file, "w") as f:
        f.write('{"images": [')
    with pytest.raises(PreflightError, match=f"annotation file {json_file}.*JSONDecodeError"):
        _train(tmp_path, shapes, train_name=name)


def test_a_dataset_name_that_is_not_registered(shapes, tmp_path):
    wrong = shapes.names["train"] + "x"
    with pytest.raises(PreflightError, match=f"'{wrong}' is not registered.*did you mean"):
        _train(tmp_path, shapes, train_name=wrong)


def test_an_output_directory_that_cannot_be_created_or_written(shapes, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    expected = {
        a_file: f"The output directory {a_file} exists and is not a directory",
        a_file / "out": f"Cannot create the output directory {a_file / 'out'}: Not a directory",
    }
    for output_dir, message in expected.items():
        with pytest.raises(PreflightError, match=message):
            train_net.do_train(tiny_train_config(output_dir, shapes.names))
    if os.geteuid() != 0:  # root writes into read-only folders
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o500)
        with pytest.raises(PreflightError, match=f"{read_only} is not writable"):
            train_net.do_train(tiny_train_config(read_only, shapes.names))


def test_train_net_checks_the_output_directory_before_writing_to_it(shapes, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    config_file = tmp_path / "config.yaml"
    LazyConfig.save(tiny_train_config(a_file / "out", shapes.names), str(config_file))
    args = default_argument_parser().parse_args(["--config-file", str(config_file)])
    with pytest.raises(PreflightError, match=f"Cannot create the output directory {a_file}"):
        import_train_net().main(args)
