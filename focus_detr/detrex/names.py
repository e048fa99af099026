"""
The names of a detrex ``projects/focus_detr`` checkpoint and their names in this package, in one
table (:data:`NAME_TABLE`) read by :mod:`focus_detr.detrex.convert`. To follow a renamed
module here, change the target names below; the converter needs no other change.
"""

import re
from typing import NamedTuple, Tuple, Union

__all__ = ["BACKBONE_PATTERNS", "DECODER_LAYERS", "NAME_TABLE", "Entry"]


class Entry(NamedTuple):
    """
    One detrex tensor name and its name here. ``{i}`` in ``source`` matches a layer / level /
    head index and is substituted in ``target``; ``{class_head}`` / ``{box_head}`` become the
    decoder head ``i`` (``i < D`` decoder layers) or the two-stage head (``i == D``). ``shape``
    holds ints, ``"*"`` (any size) or sizes named after the checkpoint's dimensions (``"C"``,
    ``"2C"``, ``"L-1"``...): every name must take one value in the whole checkpoint. ``kind``:
    "required", "optional" (a missing index group is fine, an incomplete one is not) or
    "alias" (a copy of another entry's module: must be identical to it).
    """

    source: str
    target: str
    shape: Tuple[Union[int, str], ...]
    kind: str = "required"


def _linear(src: str, dst: str, out: Union[int, str], inp: str, kind: str = "required"):
    return [
        Entry(f"{src}.weight", f"{dst}.weight", (out, inp), kind),
        Entry(f"{src}.bias", f"{dst}.bias", (out,), kind),
    ]


def _norm(src: str, dst: str, kind: str = "required"):
    return [Entry(f"{src}.{p}", f"{dst}.{p}", ("C",), kind) for p in ("weight", "bias")]


def _conv(src: str, dst: str, kernel: int, kind: str = "required"):
    return [
        Entry(f"{src}.weight", f"{dst}.weight", ("C", "*", kernel, kernel), kind),
        Entry(f"{src}.bias", f"{dst}.bias", ("C",), kind),
    ]


def _attention(src: str, dst: str):
    return [
        Entry(f"{src}.in_proj_weight", f"{dst}.in_proj_weight", ("3C", "C")),
        Entry(f"{src}.in_proj_bias", f"{dst}.in_proj_bias", ("3C",)),
        *_linear(f"{src}.out_proj", f"{dst}.out_proj", "C", "C"),
    ]


def _deformable(src: str, dst: str, points: str):
    # points = heads * levels * sampling points
    return [
        *_linear(f"{src}.sampling_offsets", f"{dst}.sampling_offsets", f"2{points}", "C"),
        *_linear(f"{src}.attention_weights", f"{dst}.attention_weights", points, "C"),
        *_linear(f"{src}.value_proj", f"{dst}.value_proj", "C", "C"),
        *_linear(f"{src}.output_proj", f"{dst}.output_proj", "C", "C"),
    ]


def _box_mlp(src: str, dst: str, kind: str = "required"):
    # detrex MLP(C, C, 4, 3) -> torchvision.ops.MLP(C, [C, C, 4]): Linear, ReLU, Dropout, ...
    return [
        *_linear(f"{src}.layers.0", f"{dst}.0", "C", "C", kind),
        *_linear(f"{src}.layers.1", f"{dst}.3", "C", "C", kind),
        *_linear(f"{src}.layers.2", f"{dst}.6", 4, "C", kind),
    ]


_ENC = "transformer.encoder.layers.{i}"
_DEC = DECODER_LAYERS = "transformer.decoder.layers.{i}"
_SEL = "transformer.enc_mask_predictor"

# detrex name -> this package's name. The only place that knows either naming.
NAME_TABLE: Tuple[Entry, ...] = (
    Entry("transformer.level_embeds", "level_embed", ("L", "C")),
    Entry("transformer.alpha", "encoder.selector.alpha", ("L-1",)),
    *_norm(f"{_SEL}.layer1.0", "encoder.selector.input_layer.0"),
    *_linear(f"{_SEL}.layer1.1", "encoder.selector.input_layer.1", "S1", "C"),
    *_linear(f"{_SEL}.layer2.0", "encoder.selector.output_layers.0", "S2", "S1"),
    *_linear(f"{_SEL}.layer2.2", "encoder.selector.output_layers.2", "S3", "S2"),
    *_linear(f"{_SEL}.layer2.4", "encoder.selector.output_layers.4", 1, "S3"),
    *_linear("transformer.enc_output", "query_selection.memory_projection.0", "C", "C"),
    *_norm("transformer.enc_output_norm", "query_selection.memory_projection.1"),
    Entry("transformer.tgt_embed.weight", "query_selection.content_queries.weight", ("Q", "C")),
    Entry("label_enc.weight", "denoising.label_embedding.weight", ("K", "C")),
    *_attention(f"{_ENC}.attentions.0.attn", "encoder.layers.{i}.self_attn"),
    *_norm(f"{_ENC}.norm2", "encoder.layers.{i}.self_attn_norm"),
    *_deformable(f"{_ENC}.attentions.1", "encoder.layers.{i}.deformable_attn", "PE"),
    *_norm(f"{_ENC}.norms.0", "encoder.layers.{i}.deformable_norm"),
    *_linear(f"{_ENC}.ffns.0.layers.0.0", "encoder.layers.{i}.ffn.0", "FE", "C"),
    *_linear(f"{_ENC}.ffns.0.layers.1", "encoder.layers.{i}.ffn.3", "C", "FE"),
    *_norm(f"{_ENC}.norms.1", "encoder.layers.{i}.ffn_norm"),
    *_attention(f"{_DEC}.attentions.0.attn", "decoder.layers.{i}.self_attn"),
    *_norm(f"{_DEC}.norms.0", "decoder.layers.{i}.norm1"),
    *_deformable(f"{_DEC}.attentions.1", "decoder.layers.{i}.cross_attn", "PD"),
    *_norm(f"{_DEC}.norms.1", "decoder.layers.{i}.norm2"),
    *_linear(f"{_DEC}.ffns.0.layers.0.0", "decoder.layers.{i}.ffn.0", "FD", "C"),
    *_linear(f"{_DEC}.ffns.0.layers.1", "decoder.layers.{i}.ffn.3", "C", "FD"),
    *_norm(f"{_DEC}.norms.2", "decoder.layers.{i}.norm3"),
    *_linear("transformer.decoder.ref_point_head.layers.0", "decoder.ref_point_head.0", "C", "2C"),
    *_linear("transformer.decoder.ref_point_head.layers.1", "decoder.ref_point_head.3", "C", "C"),
    *_norm("transformer.decoder.norm", "decoder.norm"),
    *_linear("class_embed.{i}", "{class_head}", "K", "C"),
    *_box_mlp("bbox_embed.{i}", "{box_head}"),
    *_linear("transformer.decoder.class_embed.{i}", "{class_head}", "K", "C", "alias"),
    *_box_mlp("transformer.decoder.bbox_embed.{i}", "{box_head}", "alias"),
    *_linear("enhance_MCSP_layerlist.{i}", "query_selection.class_head", "K", "C", "alias"),
    *_linear(
        "transformer.encoder.enhance_MCSP.{i}", "query_selection.class_head", "K", "C", "alias"
    ),
    *_conv("neck.convs.{i}.conv", "neck.projections.{i}.0", 1),
    *_norm("neck.convs.{i}.norm", "neck.projections.{i}.1"),
    *_conv("neck.extra_convs.{i}.conv", "neck.extra_levels.{i}.0", 3, "optional"),
    *_norm("neck.extra_convs.{i}.norm", "neck.extra_levels.{i}.1", "optional"),
)

# Backbone keys are kept; they must follow detectron2's ResNet or SwinTransformer naming.
_BN = r"norm\.(weight|bias|running_mean|running_var|num_batches_tracked)"
BACKBONE_PATTERNS = tuple(
    re.compile(pattern)
    for pattern in (
        rf"backbone\.stem\.conv1\.(weight|{_BN})",
        rf"backbone\.res[2-5]\.\d+\.(conv[1-3]|shortcut)\.(weight|{_BN})",
        r"backbone\.patch_embed\.(proj|norm)\.(weight|bias)",
        r"backbone\.absolute_pos_embed",
        r"backbone\.layers\.\d+\.blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
        r"\.(weight|bias)",
        r"backbone\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_(bias_table|index)",
        r"backbone\.layers\.\d+\.downsample\.(reduction\.weight|norm\.(weight|bias))",
        r"backbone\.norm\d+\.(weight|bias)",
    )
)
