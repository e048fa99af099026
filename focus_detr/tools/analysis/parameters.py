"""Parameter counts of a two-stage DETR, in total and per part."""

from typing import Dict

from fvcore.nn import parameter_count
from torch import nn

from .models import MODEL_PARTS, OTHER_PART

__all__ = ["count_parameters"]


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
