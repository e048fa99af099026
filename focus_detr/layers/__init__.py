from .key_aware_deform_attn import KeyAwareDeformableAttention, key_aware_deformable_attention
from .ms_deform_attn import (
    MultiScaleDeformableAttention,
    deformable_sampling_locations,
    get_msda_backend,
    msda_backend,
    multi_scale_deformable_attention,
    set_msda_backend,
)
from .ms_deform_attn_op import extension_available
from .ms_deform_attn_reference import (
    multi_scale_bilinear_sample,
    multi_scale_deformable_attention_reference,
)

__all__ = [
    "KeyAwareDeformableAttention",
    "MultiScaleDeformableAttention",
    "deformable_sampling_locations",
    "extension_available",
    "get_msda_backend",
    "key_aware_deformable_attention",
    "msda_backend",
    "multi_scale_bilinear_sample",
    "multi_scale_deformable_attention",
    "multi_scale_deformable_attention_reference",
    "set_msda_backend",
]
