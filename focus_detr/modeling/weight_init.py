"""Initialisation of the transformer, and loading checkpoints written by earlier versions."""

import re
from typing import Dict, List

import torch
from torch import nn

from ..layers import KeyAwareDeformableAttention, MultiScaleDeformableAttention

__all__ = ["TRANSFORMER_INITS", "migrate_state_dict", "reference_transformer_init"]

TRANSFORMER_INITS = ("xavier", "module")


def reference_transformer_init(model: nn.Module) -> None:
    """
    The reference initialisation (Deformable DETR, DINO, Focus-DETR): Xavier-uniform on every
    weight matrix of the transformer (the encoder, the decoder layers and their query position
    MLP, the two-stage memory projection and content queries), then every deformable attention
    module's own initialisation again (zero offsets on a ring, zero attention weights), and each
    encoder's head initialisation (``reset_head_parameters``). The class and box heads of the
    decoder and of the two-stage selection, the label embedding of the denoising queries and
    the neck keep their own initialisation, as in the reference; so does an encoder that
    declares ``keeps_own_init`` (RT-DETR's hybrid encoder: its reference keeps PyTorch's
    initialisation of the convolutions and of the attention layer).

    Args:
        model: a ``TwoStageDETR``.
    """
    encoder_parts: List[nn.Module] = [] if model.encoder.keeps_own_init else [model.encoder]
    parts: List[nn.Module] = encoder_parts + [
        model.decoder.layers,
        model.decoder.ref_point_head,
        model.query_selection.memory_projection,
        model.query_selection.content_queries,
    ]
    with torch.no_grad():
        for part in parts:
            for parameter in part.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)
    for part in parts:
        for module in part.modules():
            if isinstance(module, (MultiScaleDeformableAttention, KeyAwareDeformableAttention)):
                module.reset_parameters()
    reset_heads = getattr(model.encoder, "reset_head_parameters", None)
    if reset_heads is not None:
        reset_heads()


# Parameter names of checkpoints written before the 3-layer box MLPs and the decoder's query
# position MLP became torchvision.ops.MLP (linear layers at indices 0, 3, 6 of a Sequential).
_OLD_MLP = re.compile(
    r"^(?P<module>(?:query_selection\.box_head|decoder\.box_heads\.\d+|decoder\.ref_point_head))"
    r"\.layers\.(?P<index>\d+)\.(?P<name>weight|bias)$"
)


def migrate_state_dict(state_dict: Dict[str, torch.Tensor], prefix: str, *args, **kwargs) -> None:
    """
    ``load_state_dict`` pre-hook of ``TwoStageDETR``: renames, in place, the parameters of
    checkpoints written by focus-detr 0.1.0 (``X.layers.i.weight`` of the box and position MLPs)
    to the current names (``X.{3 * i}.weight``), so that old checkpoints keep loading.
    """
    for key in [key for key in state_dict if key.startswith(prefix)]:
        match = _OLD_MLP.match(key[len(prefix) :])
        if match is None:
            continue
        new_key = f"{prefix}{match['module']}.{3 * int(match['index'])}.{match['name']}"
        if new_key not in state_dict:
            state_dict[new_key] = state_dict.pop(key)
