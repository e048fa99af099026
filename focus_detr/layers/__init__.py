from ._extension import extension_available
from .ms_deform_attn import MultiScaleDeformableAttention
from .ms_deform_attn_function import (
    get_msda_backend,
    msda_backend,
    multi_scale_deformable_attention,
    set_msda_backend,
)
from .ms_deform_attn_reference import multi_scale_deformable_attention_reference

__all__ = [
    "MultiScaleDeformableAttention",
    "extension_available",
    "get_msda_backend",
    "msda_backend",
    "multi_scale_deformable_attention",
    "multi_scale_deformable_attention_reference",
    "set_msda_backend",
]
