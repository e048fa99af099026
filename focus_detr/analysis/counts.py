"""Parameters and FLOPs of a two-stage DETR, in total and per part (fvcore)."""

import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch
from detectron2.utils.analysis import FlopCountAnalysis
from fvcore.nn import parameter_count
from torch import nn

from focus_detr.layers.flop_count import ALL_FLOP_HANDLES

from .inputs import model_inputs
from .models import MODEL_PARTS, OTHER_PART

__all__ = ["FlopCount", "count_flops", "count_flops_per_image", "count_parameters"]

# detectron2's TracingAdapter holds the detector as its submodule "model".
_PREFIX = "model."


def count_parameters(model: nn.Module) -> Dict[str, int]:
    """
    Parameters (elements) of ``model``: ``total``, one entry per :data:`MODEL_PARTS` (the
    heads an encoder borrows from the query selection count for the query selection, which
    owns them) and ``other`` (level and denoising embeddings, anything else), so that the parts
    add up to the total.
    """
    counts = parameter_count(model)
    total = int(counts[""])
    parts = {part: int(counts.get(part, 0)) for part in MODEL_PARTS}
    return {"total": total, **parts, OTHER_PART: total - sum(parts.values())}


@dataclass
class FlopCount:
    """
    FLOPs of one image in fvcore's unit (one multiply-add = one flop).

    Attributes:
        parts: ``total``, one entry per :data:`MODEL_PARTS` and ``other`` (position embedding,
            pre- and post-processing: what no part's forward called); the parts add up to the
            total.
        uncounted_ops: traced ops fvcore has no handle for (elementwise ops, sorting,
            indexing), with how often they ran: they are not in any count.
    """

    parts: Dict[str, int]
    uncounted_ops: Dict[str, int] = field(default_factory=dict)


def count_flops(model: nn.Module, image_input: Dict) -> FlopCount:
    """
    FLOPs of ``model``'s inference on one dataset-mapper dict, counted with detectron2's
    ``FlopCountAnalysis`` and the handles of :data:`~focus_detr.layers.flop_count.ALL_FLOP_HANDLES`
    (deformable attention, fused attention). Ops are attributed to the module that *called*
    them (fvcore's ``ancestor_mode("caller")``): the two-stage heads the encoder calls to score
    its tokens count for the encoder, their calls by the query selection for the query
    selection.
    """
    if model.training:
        raise ValueError("count FLOPs of a model in eval mode (the inference graph)")
    inputs = model_inputs([image_input])
    # the trace's TracerWarnings and fvcore's per-op notes are not the user's business here
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(model, inputs).set_op_handle(**ALL_FLOP_HANDLES)
        analysis.ancestor_mode("caller")
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by_module = analysis.by_module()
        uncounted = dict(analysis.unsupported_ops())
    total = int(by_module[""])
    parts = {part: int(by_module.get(_PREFIX + part, 0)) for part in MODEL_PARTS}
    return FlopCount(
        parts={"total": total, **parts, OTHER_PART: total - sum(parts.values())},
        uncounted_ops=uncounted,
    )


def count_flops_per_image(model: nn.Module, inputs: Sequence[Dict]) -> FlopCount:
    """
    :func:`count_flops` of every image (batch 1), averaged: the mean FLOPs per image of every
    part (floats when the images differ), and the uncounted ops summed over the images.
    """
    if not inputs:
        raise ValueError("need at least one input image to count FLOPs")
    counts: List[FlopCount] = [count_flops(model, item) for item in inputs]
    keys = counts[0].parts.keys()
    means = {key: sum(count.parts[key] for count in counts) / len(counts) for key in keys}
    uncounted: Counter = Counter()
    for count in counts:
        uncounted.update(count.uncounted_ops)
    return FlopCount(parts=means, uncounted_ops=dict(sorted(uncounted.items())))
