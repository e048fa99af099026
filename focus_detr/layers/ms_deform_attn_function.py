"""Dispatch of the multi-scale deformable attention op (compiled kernels or the PyTorch reference).

NOTE: provisional version; the torch.library registration replaces the body of this file.
"""

import torch

from .ms_deform_attn_reference import multi_scale_deformable_attention_reference

__all__ = ["multi_scale_deformable_attention"]


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """See :func:`multi_scale_deformable_attention_reference` for the contract; (B, Nq, H * D)."""
    return multi_scale_deformable_attention_reference(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
