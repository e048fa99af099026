"""What every encoder of the package returns to the meta-architecture."""

from dataclasses import dataclass, field
from typing import List, Optional

import torch

__all__ = ["EncoderOutput"]


@dataclass
class EncoderOutput:
    """
    Output of an encoder (``FocusEncoder`` and the alternative encoders).

    Attributes:
        memory: (B, N, C) encoded tokens; tokens an encoder never updated keep their input value.
        foreground_logits: (B, N) raw foreground logits of the token selector, padded tokens filled
            with a finite value no larger than any valid logit; None for encoders without a
            selector. Carries the gradient of the selector (for its own loss).
        layer_indices: one (B, k_l) int64 tensor per encoder layer: the token indices the layer
            gathered, best first (for visualisation and for auxiliary heads).
        layer_valid: one (B, k_l) bool tensor per layer: True where the layer wrote the token
            back into ``memory`` (inside the image's budget, never a padded token).
    """

    memory: torch.Tensor
    foreground_logits: Optional[torch.Tensor] = None
    layer_indices: List[torch.Tensor] = field(default_factory=list)
    layer_valid: List[torch.Tensor] = field(default_factory=list)
