"""
The detrex checkpoint converter on state dicts written out here with detrex's Focus-DETR names
and shapes (detrex is not imported): tiny sizes, so nothing in the converter may assume the R50
channels, 80 classes, 6 layers or 4 levels.
"""

import os
import re
import subprocess
import sys
from typing import Dict, Sequence

import helpers
import pytest
import torch

from focus_detr.detrex import convert_detrex_state_dict, load_state_dict
from focus_detr.tools.convert_detrex import main

REPO_ROOT = str(helpers.REPO_ROOT)
# heads detrex keeps under two or more names, as in FOCUS_DETR.__init__
ALIASES = (
    "transformer.decoder.class_embed.",
    "transformer.decoder.bbox_embed.",
    "transformer.encoder.enhance_MCSP.",
    "enhance_MCSP_layerlist.",
)
# the 3-layer box MLPs and ref_point_head are torchvision.ops.MLP: Linear, ReLU, Dropout, ...
_MLP_HEADS = r"(query_selection\.box_head|decoder\.box_heads\.\d+|decoder\.ref_point_head)"


def detrex_state_dict(
    *,
    channels: int = 8,
    classes: int = 3,
    queries: int = 5,
    backbone_channels: Sequence[int] = (16, 32),
    extra_levels: int = 1,
    encoder_layers: int = 2,
    decoder_layers: int = 2,
    ffn: int = 16,
    heads: int = 2,
    points: int = 1,
    seed: int = 0,
) -> Dict[str, torch.Tensor]:
    """A detrex ``FOCUS_DETR`` state dict (ResNet backbone reduced to a few keys), random values."""
    generator = torch.Generator().manual_seed(seed)
    state: Dict[str, torch.Tensor] = {}
    c = channels
    levels = len(backbone_channels) + extra_levels
    sampling = heads * levels * points

    def add(name, *shape):
        state[name] = torch.randn(*shape, generator=generator)

    def linear(name, out, inp):
        add(f"{name}.weight", out, inp)
        add(f"{name}.bias", out)

    def norm(name, size=c):
        add(f"{name}.weight", size)
        add(f"{name}.bias", size)

    add("backbone.stem.conv1.weight", 4, 3, 7, 7)
    for part in ("weight", "bias", "running_mean", "running_var"):
        add(f"backbone.stem.conv1.norm.{part}", 4)
    add("backbone.res5.2.conv3.weight", 32, 8, 1, 1)
    for i, in_channels in enumerate(backbone_channels):
        add(f"neck.convs.{i}.conv.weight", c, in_channels, 1, 1)
        add(f"neck.convs.{i}.conv.bias", c)
        norm(f"neck.convs.{i}.norm")
    for i in range(extra_levels):
        add(f"neck.extra_convs.{i}.conv.weight", c, backbone_channels[-1] if i == 0 else c, 3, 3)
        add(f"neck.extra_convs.{i}.conv.bias", c)
        norm(f"neck.extra_convs.{i}.norm")
    add("transformer.alpha", levels - 1)
    add("transformer.level_embeds", levels, c)
    for kind, count in (("encoder", encoder_layers), ("decoder", decoder_layers)):
        for i in range(count):
            layer = f"transformer.{kind}.layers.{i}"
            add(f"{layer}.attentions.0.attn.in_proj_weight", 3 * c, c)
            add(f"{layer}.attentions.0.attn.in_proj_bias", 3 * c)
            linear(f"{layer}.attentions.0.attn.out_proj", c, c)
            linear(f"{layer}.attentions.1.sampling_offsets", 2 * sampling, c)
            linear(f"{layer}.attentions.1.attention_weights", sampling, c)
            linear(f"{layer}.attentions.1.value_proj", c, c)
            linear(f"{layer}.attentions.1.output_proj", c, c)
            linear(f"{layer}.ffns.0.layers.0.0", ffn, c)
            linear(f"{layer}.ffns.0.layers.1", c, ffn)
            for j in range(2 if kind == "encoder" else 3):
                norm(f"{layer}.norms.{j}")
            if kind == "encoder":
                norm(f"{layer}.norm2")
    linear("transformer.decoder.ref_point_head.layers.0", c, 2 * c)
    linear("transformer.decoder.ref_point_head.layers.1", c, c)
    norm("transformer.decoder.norm")
    add("transformer.tgt_embed.weight", queries, c)
    linear("transformer.enc_output", c, c)
    norm("transformer.enc_output_norm")
    norm("transformer.enc_mask_predictor.layer1.0")
    linear("transformer.enc_mask_predictor.layer1.1", c, c)
    linear("transformer.enc_mask_predictor.layer2.0", c // 2, c)
    linear("transformer.enc_mask_predictor.layer2.2", c // 4, c // 2)
    linear("transformer.enc_mask_predictor.layer2.4", 1, c // 4)
    for i in range(decoder_layers + 1):  # the last head is the two-stage head
        linear(f"class_embed.{i}", classes, c)
        for j, out in enumerate((c, c, 4)):
            linear(f"bbox_embed.{i}.layers.{j}", out, c)
    add("label_enc.weight", classes, c)
    for key in [k for k in state if k.startswith(("class_embed.", "bbox_embed."))]:
        state[f"transformer.decoder.{key}"] = state[key].clone()
    for i in range(encoder_layers):
        for part in ("weight", "bias"):
            head = state[f"class_embed.{decoder_layers}.{part}"]
            state[f"enhance_MCSP_layerlist.{i}.{part}"] = head.clone()
            state[f"transformer.encoder.enhance_MCSP.{i}.{part}"] = head.clone()
    return state


def _non_alias_count(state):
    return sum(not key.startswith(ALIASES) for key in state)


def test_every_key_lands_where_it_belongs():
    state = detrex_state_dict()
    converted = convert_detrex_state_dict(state)
    expected = {
        "backbone.stem.conv1.weight": "backbone.stem.conv1.weight",
        "backbone.stem.conv1.norm.running_var": "backbone.stem.conv1.norm.running_var",
        "neck.convs.1.conv.weight": "neck.projections.1.0.weight",
        "neck.convs.0.norm.bias": "neck.projections.0.1.bias",
        "neck.extra_convs.0.conv.weight": "neck.extra_levels.0.0.weight",
        "neck.extra_convs.0.norm.weight": "neck.extra_levels.0.1.weight",
        "transformer.level_embeds": "level_embed",
        "transformer.alpha": "encoder.selector.alpha",
        "transformer.enc_mask_predictor.layer1.0.weight": "encoder.selector.input_layer.0.weight",
        "transformer.enc_mask_predictor.layer1.1.bias": "encoder.selector.input_layer.1.bias",
        "transformer.enc_mask_predictor.layer2.4.weight": "encoder.selector.output_layers.4.weight",
        "transformer.enc_output.weight": "query_selection.memory_projection.0.weight",
        "transformer.enc_output_norm.bias": "query_selection.memory_projection.1.bias",
        "transformer.tgt_embed.weight": "query_selection.content_queries.weight",
        "label_enc.weight": "denoising.label_embedding.weight",
        "transformer.encoder.layers.1.attentions.0.attn.in_proj_weight": (
            "encoder.layers.1.self_attn.in_proj_weight"
        ),
        "transformer.encoder.layers.0.norm2.weight": "encoder.layers.0.self_attn_norm.weight",
        "transformer.encoder.layers.1.attentions.1.sampling_offsets.weight": (
            "encoder.layers.1.deformable_attn.sampling_offsets.weight"
        ),
        "transformer.encoder.layers.0.norms.0.bias": "encoder.layers.0.deformable_norm.bias",
        "transformer.encoder.layers.1.ffns.0.layers.1.weight": "encoder.layers.1.ffn.3.weight",
        "transformer.encoder.layers.1.norms.1.weight": "encoder.layers.1.ffn_norm.weight",
        "transformer.decoder.layers.0.attentions.0.attn.out_proj.bias": (
            "decoder.layers.0.self_attn.out_proj.bias"
        ),
        "transformer.decoder.layers.1.norms.0.weight": "decoder.layers.1.norm1.weight",
        "transformer.decoder.layers.1.attentions.1.value_proj.weight": (
            "decoder.layers.1.cross_attn.value_proj.weight"
        ),
        "transformer.decoder.layers.0.norms.1.bias": "decoder.layers.0.norm2.bias",
        "transformer.decoder.layers.0.ffns.0.layers.0.0.weight": "decoder.layers.0.ffn.0.weight",
        "transformer.decoder.layers.1.norms.2.weight": "decoder.layers.1.norm3.weight",
        "transformer.decoder.ref_point_head.layers.0.weight": "decoder.ref_point_head.0.weight",
        "transformer.decoder.ref_point_head.layers.1.bias": "decoder.ref_point_head.3.bias",
        "transformer.decoder.norm.weight": "decoder.norm.weight",
        "class_embed.0.weight": "decoder.class_heads.0.weight",
        "class_embed.1.bias": "decoder.class_heads.1.bias",
        "class_embed.2.weight": "query_selection.class_head.weight",
        "bbox_embed.1.layers.0.weight": "decoder.box_heads.1.0.weight",
        "bbox_embed.0.layers.1.bias": "decoder.box_heads.0.3.bias",
        "bbox_embed.1.layers.2.weight": "decoder.box_heads.1.6.weight",
        "bbox_embed.2.layers.2.bias": "query_selection.box_head.6.bias",
    }
    for source, target in expected.items():
        assert converted[target] is state[source], (source, target)
    assert len(converted) == _non_alias_count(state)


def test_output_loads_into_the_model():
    # the tiny test model's sizes: 32 channels, 4 heads, 2 points, 4 levels, 2 + 2 layers
    model = helpers.build_tiny_model().eval()
    target = model.state_dict()
    state = detrex_state_dict(
        channels=32, classes=3, queries=20, backbone_channels=(128, 256, 512), extra_levels=1,
        encoder_layers=2, decoder_layers=2, ffn=64, heads=4, points=2,
    )  # fmt: skip
    state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    state.update({k: v + 1.0 for k, v in target.items() if k.startswith("backbone.")})
    converted = _model_names(convert_detrex_state_dict(state), target)
    model.load_state_dict(converted, strict=True)
    loaded = model.state_dict()
    assert torch.equal(loaded["level_embed"], state["transformer.level_embeds"])
    assert torch.equal(
        loaded["query_selection.class_head.weight"], state["enhance_MCSP_layerlist.1.weight"]
    )


def _model_names(converted, target):
    """Until the box MLPs are torchvision MLPs here, their linear layers are ``layers.{0,1,2}``."""
    if any(re.fullmatch(rf"{_MLP_HEADS}\.\d+\.weight", key) for key in target):
        return converted
    pattern = re.compile(rf"{_MLP_HEADS}\.(\d+)\.(weight|bias)")

    def rename(key):
        match = pattern.fullmatch(key)
        return f"{match[1]}.layers.{int(match[2]) // 3}.{match[3]}" if match else key

    return {rename(key): value for key, value in converted.items()}


def test_sizes_come_from_the_checkpoint():
    state = detrex_state_dict(channels=16, classes=7, encoder_layers=3, decoder_layers=1, points=2)
    converted = convert_detrex_state_dict(state)
    assert converted["query_selection.class_head.weight"].shape == (7, 16)
    assert "decoder.class_heads.0.weight" in converted
    assert "decoder.class_heads.1.weight" not in converted
    assert "encoder.layers.2.ffn.3.bias" in converted
    # no extra level: the neck has backbone levels only
    converted = convert_detrex_state_dict(detrex_state_dict(extra_levels=0))
    assert not any(key.startswith("neck.extra_levels") for key in converted)


def test_swin_backbone_keys_are_kept():
    state = detrex_state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    swin = {
        "backbone.patch_embed.proj.weight": torch.zeros(8, 3, 4, 4),
        "backbone.layers.0.blocks.1.attn.relative_position_bias_table": torch.zeros(169, 2),
        "backbone.layers.0.blocks.1.attn.relative_position_index": torch.zeros(49, 49).long(),
        "backbone.layers.2.blocks.5.mlp.fc2.bias": torch.zeros(8),
        "backbone.layers.1.downsample.reduction.weight": torch.zeros(16, 32),
        "backbone.norm3.weight": torch.zeros(32),
    }
    converted = convert_detrex_state_dict({**swin, **state})
    for key, value in swin.items():
        assert converted[key] is value


def test_mismatching_alias_is_rejected():
    state = detrex_state_dict()
    state["transformer.encoder.enhance_MCSP.1.bias"][0] += 1e-6
    with pytest.raises(ValueError, match=r"transformer\.encoder\.enhance_MCSP\.1\.bias differs"):
        convert_detrex_state_dict(state)
    state = detrex_state_dict()
    state["transformer.decoder.bbox_embed.0.layers.2.weight"] = torch.zeros(4, 8)
    with pytest.raises(ValueError, match=r"bbox_embed\.0\.layers\.2\.weight differs"):
        convert_detrex_state_dict(state)


def test_unknown_key_is_rejected_with_its_name():
    for key in ("transformer.encoder.layers.0.norms.7.weight", "backbone.blocks.0.attn.qkv.weight"):
        state = detrex_state_dict()
        state[key] = torch.zeros(8)
        with pytest.raises(ValueError, match=re.escape(key)):
            convert_detrex_state_dict(state)
    state = detrex_state_dict()
    state["class_embed.1.weight"] = [1.0]
    with pytest.raises(ValueError, match=r"class_embed\.1\.weight is a list, not a tensor"):
        convert_detrex_state_dict(state)


@pytest.mark.parametrize(
    "key, shape",
    [
        ("transformer.decoder.ref_point_head.layers.0.weight", (8, 12)),
        ("class_embed.1.weight", (4, 8)),  # another class count than the other heads
        ("bbox_embed.2.layers.2.bias", (5,)),
        ("transformer.alpha", (3,)),  # 3 levels need 2 modulation coefficients
        ("transformer.encoder.layers.1.attentions.1.sampling_offsets.weight", (9, 8)),
        ("neck.convs.0.conv.weight", (8, 16, 3, 3)),
        ("transformer.level_embeds", (3, 8, 1)),
    ],
)
def test_wrong_shape_is_rejected_with_its_name(key, shape):
    state = detrex_state_dict()
    state[key] = torch.zeros(shape)
    with pytest.raises(ValueError, match=re.escape(f"{key} has shape {list(shape)}")):
        convert_detrex_state_dict(state)


def test_missing_and_inconsistent_parts_are_rejected():
    state = detrex_state_dict()
    del state["transformer.decoder.layers.1.norms.2.bias"]
    with pytest.raises(
        ValueError, match=r"missing .*transformer\.decoder\.layers\.1\.norms\.2\.bias"
    ):
        convert_detrex_state_dict(state)
    state = detrex_state_dict(decoder_layers=3)
    state = {k: v for k, v in state.items() if "decoder.layers.1." not in k}
    with pytest.raises(ValueError, match=r"transformer\.decoder\.layers\.\{i\}: indices \[0, 2\]"):
        convert_detrex_state_dict(state)
    state = detrex_state_dict()
    state = {k: v for k, v in state.items() if not re.match(r"(transformer\.)?\w+_embed\.2", k)}
    with pytest.raises(ValueError, match=r"class_embed\.\{i\} has 2 heads"):
        convert_detrex_state_dict(state)


def test_both_checkpoint_formats(tmp_path):
    state = detrex_state_dict()
    torch.save({"model": state, "iteration": 89999, "optimizer": {"state": {}}}, tmp_path / "a")
    torch.save(state, tmp_path / "b")
    for name in ("a", "b"):
        loaded = load_state_dict(str(tmp_path / name))
        assert loaded.keys() == state.keys()
        converted = convert_detrex_state_dict(loaded)
        assert torch.equal(converted["level_embed"], state["transformer.level_embeds"])
    torch.save([1, 2], tmp_path / "c")
    with pytest.raises(ValueError, match="holds a list"):
        load_state_dict(str(tmp_path / "c"))


def test_cli_error_names_the_key(tmp_path, capsys):
    state = detrex_state_dict()
    state["transformer.decoder.layers.0.norms.1.weight"] = torch.zeros(9)
    torch.save(state, tmp_path / "in.pth")
    assert main([str(tmp_path / "in.pth"), str(tmp_path / "out.pth")]) == 1
    assert "transformer.decoder.layers.0.norms.1.weight has shape [9]" in capsys.readouterr().err
    assert not (tmp_path / "out.pth").exists()


def test_cli_writes_a_detectron2_checkpoint(tmp_path):
    state = detrex_state_dict()
    torch.save({"model": state, "iteration": 3}, tmp_path / "in.pth")
    result = subprocess.run(
        [sys.executable, "-m", "focus_detr.tools.convert_detrex", "in.pth", "out.pth"],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    written = torch.load(tmp_path / "out.pth", map_location="cpu", weights_only=True)
    assert list(written) == ["model"]
    expected = convert_detrex_state_dict(state)
    assert written["model"].keys() == expected.keys()
    assert all(torch.equal(written["model"][k], v) for k, v in expected.items())


def test_cli_never_writes_over_its_input_or_an_existing_file(tmp_path, capsys):
    state = detrex_state_dict()
    torch.save({"model": state}, tmp_path / "in.pth")
    before = (tmp_path / "in.pth").read_bytes()
    assert main([str(tmp_path / "in.pth"), str(tmp_path / "in.pth")]) == 1
    error = capsys.readouterr().err
    assert f"The output {tmp_path / 'in.pth'} is the input" in error and "--overwrite" in error
    assert (tmp_path / "in.pth").read_bytes() == before
    (tmp_path / "out.pth").write_bytes(b"someone's file")
    assert main([str(tmp_path / "in.pth"), str(tmp_path / "out.pth")]) == 1
    assert f"The output {tmp_path / 'out.pth'} exists" in capsys.readouterr().err
    assert (tmp_path / "out.pth").read_bytes() == b"someone's file"
    assert main([str(tmp_path / "in.pth"), str(tmp_path / "out.pth"), "--overwrite"]) == 0
    converted = torch.load(tmp_path / "out.pth", weights_only=True)["model"]
    assert converted.keys() == convert_detrex_state_dict(state).keys()
