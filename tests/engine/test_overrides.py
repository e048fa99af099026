"""
Command-line overrides name existing keys (focus_detr.engine.overrides): a mistyped key is
rejected naming the nearest valid one, before anything is written; an argument of the object a
LazyCall node builds may be set; a new key is added on purpose with a leading '+'.
"""

import pytest
from detectron2.config import LazyConfig
from helpers import DEMO_CONFIG, import_train_net, tiny_train_config

from focus_detr.engine import ConfigOverrideError, apply_overrides


def _demo():
    return LazyConfig.load(str(DEMO_CONFIG))


@pytest.mark.parametrize(
    "override, nearest",
    [
        ("train.max_iterr=2", "train.max_iter"),
        ("train.amp.enabeld=True", "train.amp.enabled"),
        ("train.init_checkpiont=weights.pth", "train.init_checkpoint"),
        ("trian.max_iter=2", "train.max_iter"),
        ("model.encoder.num_layer=2", "model.encoder.num_layers"),
        ("model.position_embeding=None", "model.position_embedding"),  # an argument of the model
        # the encoder passes **kwargs to its base class: still checked, against both
        ("model.encoder.num_head=2", "model.encoder.num_heads"),
    ],
)
def test_a_mistyped_key_is_rejected_naming_the_nearest_valid_one(override, nearest):
    key = override.split("=")[0]
    with pytest.raises(ConfigOverrideError) as error:
        apply_overrides(_demo(), [override])
    message = str(error.value)
    assert f"{key!r} is neither a key of the config" in message
    assert f"did you mean {nearest!r}?" in message
    assert f"write +{override}" in message


def test_valid_overrides_arguments_of_targets_and_added_keys():
    cfg = apply_overrides(
        _demo(),
        [
            "train.max_iter=7",
            "train.amp.enabled=False",
            "dataloader.train.mapper.augmentations.1.short_edge_length=100",
            "model.position_embedding=null",  # not in the config: an argument of TwoStageDETR
            "model.encoder.selector_hidden_dim=64",  # likewise, of the Focus encoder
            "+train.my_option=3",
        ],
    )
    assert cfg.train.max_iter == 7 and cfg.train.amp.enabled is False
    assert cfg.dataloader.train.mapper.augmentations[1].short_edge_length == 100
    assert cfg.model.position_embedding is None and cfg.model.encoder.selector_hidden_dim == 64
    assert cfg.train.my_option == 3
    with pytest.raises(ConfigOverrideError, match=r"which the config has already: drop the '\+'"):
        apply_overrides(_demo(), ["+train.max_iter=3"])


def test_train_net_rejects_a_mistyped_key_before_writing_anything(shapes, tmp_path):
    config_file = tmp_path / "config.yaml"
    output_dir = tmp_path / "out"
    LazyConfig.save(tiny_train_config(output_dir, shapes.names), str(config_file))
    train_net = import_train_net()
    args = train_net.build_parser().parse_args(
        ["--config-file", str(config_file), "train.init_checkpiont=weights.pth"]
    )
    with pytest.raises(ConfigOverrideError, match="did you mean 'train.init_checkpoint'"):
        train_net.main(args)
    assert not output_dir.exists()
