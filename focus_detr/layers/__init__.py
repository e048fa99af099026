from .ms_deform_attn import MultiScaleDeformableAttention
from .ms_deform_attn_function import multi_scale_deformable_attention
from .ms_deform_attn_reference import multi_scale_deformable_attention_reference

__all__ = [
    "MultiScaleDeformableAttention",
    "multi_scale_deformable_attention",
    "multi_scale_deformable_attention_reference",
]
