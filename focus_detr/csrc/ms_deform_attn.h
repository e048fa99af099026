// Multi-scale deformable attention (Deformable DETR): kernel entry points and shared checks.
//
// Shapes (batch first, all floating tensors of one dtype, float32 or float64):
//   value               (B, Nv, H, D)   values of all levels, flattened level after level
//   spatial_shapes      (L, 2) int64    (height, width) of each level
//   level_start_index   (L,) int64      offset of each level along Nv
//   sampling_locations  (B, Nq, H, L, P, 2) normalized (x, y), align_corners=False
//   attention_weights   (B, Nq, H, L, P)
//   output              (B, Nq, H * D)
// Bilinear sampling with zero padding: the centre of cell j of a level of width W is at
// x = (j + 0.5) / W. Non-finite inputs (the same rules as ms_deform_attn_reference.py):
// - a sample whose footprint misses its level (x = loc_x * W - 0.5 outside [-1, W) or likewise
//   in y; NaN, +-inf and huge locations included) contributes zero whatever its weight, and
//   gets zero gradients; no memory is read or written for it;
// - a NaN or infinite attention weight of a sample that touches its level counts as NaN.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace focus_detr {

using GradTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Sizes shared by every kernel, read from validated inputs.
struct MsdaSizes {
  int64_t batch;
  int64_t num_values;
  int64_t num_heads;
  int64_t head_dim;
  int64_t num_queries;
  int64_t num_levels;
  int64_t num_points;
};

// Checks ranks, sizes, dtypes and devices (not the contents of spatial_shapes) and returns the
// sizes. grad_output is checked too when defined.
MsdaSizes check_ms_deform_attn_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);

at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

// Returns (grad_value, grad_sampling_locations, grad_attention_weights).
GradTriple ms_deform_attn_backward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);

#ifdef WITH_CUDA
at::Tensor ms_deform_attn_forward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

GradTriple ms_deform_attn_backward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output);
#endif

}  // namespace focus_detr
