// CUDA kernels of multi-scale deformable attention.
//
// One warp handles one (batch, query, head) row; its lanes walk the channels with a stride of
// 32, so any head dim works (30, 71, 1025, ...) without assumptions on the block size. In the
// backward pass the per-sample dot products are reduced with warp shuffles (the row is owned by
// one warp, so the gradients of locations and weights need no atomics); grad_value is
// accumulated with atomicAdd.
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which needs the cuSPARSE and
// cuBLAS headers that a bare CUDA toolkit may not have).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>

#include "ms_deform_attn.h"

namespace focus_detr {

namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreadsPerBlock = kWarpSize * kWarpsPerBlock;
constexpr int64_t kMaxBlocks = 1 << 20;  // the loops are grid-strided

struct Sizes {
  int64_t rows;  // batch * queries * heads
  int64_t num_queries;
  int64_t num_values;
  int64_t num_heads;
  int64_t head_dim;
  int64_t num_levels;
  int64_t num_points;
};

// loc * size - 0.5 rounded after the product and after the difference, as PyTorch computes it
// in ms_deform_attn_reference.py: nvcc would otherwise contract it into one fused multiply-add,
// and the test of footprint() could then differ from the reference's at the level borders.
__device__ __forceinline__ float scaled_location(float loc, int64_t size) {
  return __fsub_rn(__fmul_rn(loc, static_cast<float>(size)), 0.5f);
}

__device__ __forceinline__ double scaled_location(double loc, int64_t size) {
  return __dsub_rn(__dmul_rn(loc, static_cast<double>(size)), 0.5);
}

// The attention weight a sample is multiplied by: NaN when it is not finite (see the CPU
// kernels' finite_or_nan: the result is then NaN in every order of evaluation).
template <typename scalar_t>
__device__ __forceinline__ scalar_t finite_or_nan(scalar_t weight) {
  return isfinite(weight) ? weight : static_cast<scalar_t>(NAN);
}

// Bilinear footprint of one sample (align_corners=False): the cells (y0x0, y0x1, y1x0, y1x1)
// as indices inside the level (-1 when outside) and their weights. False when no cell is hit:
// -1 <= x < width and -1 <= y < height fail, which NaN, +-inf and huge locations fail too.
template <typename scalar_t>
__device__ __forceinline__ bool footprint(
    scalar_t loc_x,
    scalar_t loc_y,
    int64_t height,
    int64_t width,
    int64_t (&index)[4],
    scalar_t (&weight)[4],
    scalar_t& fx,
    scalar_t& fy) {
  const scalar_t x = scaled_location(loc_x, width);
  const scalar_t y = scaled_location(loc_y, height);
  // The range test comes before any conversion to an integer: past it x and y are finite and
  // in [-1, size), so the int64 corner indices below cannot overflow.
  if (!(x >= scalar_t(-1) && y >= scalar_t(-1) && x < static_cast<scalar_t>(width) &&
        y < static_cast<scalar_t>(height))) {
    return false;
  }
  const scalar_t x_floor = floor(x);
  const scalar_t y_floor = floor(y);
  const int64_t x0 = static_cast<int64_t>(x_floor);
  const int64_t y0 = static_cast<int64_t>(y_floor);
  fx = x - x_floor;
  fy = y - y_floor;
  weight[0] = (1 - fx) * (1 - fy);
  weight[1] = fx * (1 - fy);
  weight[2] = (1 - fx) * fy;
  weight[3] = fx * fy;
  const bool x0_in = x0 >= 0;
  const bool x1_in = x0 + 1 < width;
  const bool y0_in = y0 >= 0;
  const bool y1_in = y0 + 1 < height;
  const int64_t row0 = y0 * width;
  const int64_t row1 = row0 + width;
  index[0] = (y0_in && x0_in) ? row0 + x0 : -1;
  index[1] = (y0_in && x1_in) ? row0 + x0 + 1 : -1;
  index[2] = (y1_in && x0_in) ? row1 + x0 : -1;
  index[3] = (y1_in && x1_in) ? row1 + x0 + 1 : -1;
  return true;
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t warp_sum(scalar_t v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename scalar_t>
__global__ void forward_kernel(
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ shapes,
    const int64_t* __restrict__ starts,
    const scalar_t* __restrict__ locations,
    const scalar_t* __restrict__ weights,
    scalar_t* __restrict__ output,
    Sizes s) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t first_warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) /
      kWarpSize;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarpSize;
  const int64_t row_stride = s.num_heads * s.head_dim;
  const int64_t samples_per_head = s.num_levels * s.num_points;
  for (int64_t row = first_warp; row < s.rows; row += warp_stride) {
    const int64_t b = row / (s.num_queries * s.num_heads);
    const int64_t h = row % s.num_heads;
    const scalar_t* value_bh = value + b * s.num_values * row_stride + h * s.head_dim;
    for (int64_t c = lane; c < s.head_dim; c += kWarpSize) {
      scalar_t acc = 0;
      for (int64_t l = 0; l < s.num_levels; ++l) {
        const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
        const scalar_t* value_level = value_bh + starts[l] * row_stride + c;
        for (int64_t p = 0; p < s.num_points; ++p) {
          const int64_t sample = row * samples_per_head + l * s.num_points + p;
          int64_t index[4];
          scalar_t weight[4], fx, fy;
          if (!footprint(
                  locations[2 * sample], locations[2 * sample + 1], height, width, index,
                  weight, fx, fy)) {
            continue;
          }
          scalar_t sampled = 0;
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (index[k] >= 0) {
              sampled += weight[k] * value_level[index[k] * row_stride];
            }
          }
          acc += finite_or_nan(weights[sample]) * sampled;
        }
      }
      output[row * s.head_dim + c] = acc;
    }
  }
}

template <typename scalar_t>
__global__ void backward_kernel(
    const scalar_t* __restrict__ value,
    const int64_t* __restrict__ shapes,
    const int64_t* __restrict__ starts,
    const scalar_t* __restrict__ locations,
    const scalar_t* __restrict__ weights,
    const scalar_t* __restrict__ grad_output,
    scalar_t* __restrict__ grad_value,
    scalar_t* __restrict__ grad_locations,
    scalar_t* __restrict__ grad_weights,
    Sizes s) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t first_warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) /
      kWarpSize;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarpSize;
  const int64_t row_stride = s.num_heads * s.head_dim;
  const int64_t samples_per_head = s.num_levels * s.num_points;
  // Every lane of a warp follows the same rows and samples, so the shuffles below are uniform.
  for (int64_t row = first_warp; row < s.rows; row += warp_stride) {
    const int64_t b = row / (s.num_queries * s.num_heads);
    const int64_t h = row % s.num_heads;
    const int64_t offset_bh = b * s.num_values * row_stride + h * s.head_dim;
    const scalar_t* grad = grad_output + row * s.head_dim;
    for (int64_t l = 0; l < s.num_levels; ++l) {
      const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
      const int64_t offset_level = offset_bh + starts[l] * row_stride;
      for (int64_t p = 0; p < s.num_points; ++p) {
        const int64_t sample = row * samples_per_head + l * s.num_points + p;
        int64_t index[4];
        scalar_t weight[4], fx, fy;
        if (!footprint(
                locations[2 * sample], locations[2 * sample + 1], height, width, index, weight,
                fx, fy)) {
          if (lane == 0) {
            grad_weights[sample] = 0;
            grad_locations[2 * sample] = 0;
            grad_locations[2 * sample + 1] = 0;
          }
          continue;
        }
        const scalar_t attention = finite_or_nan(weights[sample]);
        scalar_t dot[4] = {0, 0, 0, 0};
        for (int64_t c = lane; c < s.head_dim; c += kWarpSize) {
          const scalar_t g = grad[c];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (index[k] >= 0) {
              const int64_t offset = offset_level + index[k] * row_stride + c;
              dot[k] += g * value[offset];
              atomicAdd(grad_value + offset, attention * weight[k] * g);
            }
          }
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          dot[k] = warp_sum(dot[k]);
        }
        if (lane == 0) {
          grad_weights[sample] =
              weight[0] * dot[0] + weight[1] * dot[1] + weight[2] * dot[2] + weight[3] * dot[3];
          grad_locations[2 * sample] = attention * static_cast<scalar_t>(width) *
              ((1 - fy) * (dot[1] - dot[0]) + fy * (dot[3] - dot[2]));
          grad_locations[2 * sample + 1] = attention * static_cast<scalar_t>(height) *
              ((1 - fx) * (dot[2] - dot[0]) + fx * (dot[3] - dot[1]));
        }
      }
    }
  }
}

Sizes make_sizes(const MsdaSizes& m) {
  return Sizes{
      m.batch * m.num_queries * m.num_heads,
      m.num_queries,
      m.num_values,
      m.num_heads,
      m.head_dim,
      m.num_levels,
      m.num_points};
}

int64_t num_blocks(int64_t rows) {
  return std::min<int64_t>(kMaxBlocks, (rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const MsdaSizes m = check_ms_deform_attn_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
      at::Tensor());
  const c10::cuda::CUDAGuard guard(value.device());
  const auto value_c = value.contiguous();
  const auto shapes_c = spatial_shapes.contiguous();
  const auto starts_c = level_start_index.contiguous();
  const auto locations_c = sampling_locations.contiguous();
  const auto weights_c = attention_weights.contiguous();
  auto output = at::empty({m.batch, m.num_queries, m.num_heads * m.head_dim}, value.options());
  const Sizes s = make_sizes(m);
  if (s.rows == 0 || m.head_dim == 0) {
    return output.zero_();
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    forward_kernel<scalar_t><<<num_blocks(s.rows), kThreadsPerBlock, 0, stream>>>(
        value_c.const_data_ptr<scalar_t>(), shapes_c.const_data_ptr<int64_t>(),
        starts_c.const_data_ptr<int64_t>(), locations_c.const_data_ptr<scalar_t>(),
        weights_c.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

GradTriple ms_deform_attn_backward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  const MsdaSizes m = check_ms_deform_attn_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
      grad_output);
  const c10::cuda::CUDAGuard guard(value.device());
  const auto value_c = value.contiguous();
  const auto shapes_c = spatial_shapes.contiguous();
  const auto starts_c = level_start_index.contiguous();
  const auto locations_c = sampling_locations.contiguous();
  const auto weights_c = attention_weights.contiguous();
  const auto grad_output_c = grad_output.contiguous();
  auto grad_value = at::zeros_like(value_c);
  auto grad_locations = at::zeros_like(locations_c);
  auto grad_weights = at::zeros_like(weights_c);
  const Sizes s = make_sizes(m);
  if (s.rows == 0) {
    return {grad_value, grad_locations, grad_weights};
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    backward_kernel<scalar_t><<<num_blocks(s.rows), kThreadsPerBlock, 0, stream>>>(
        value_c.const_data_ptr<scalar_t>(), shapes_c.const_data_ptr<int64_t>(),
        starts_c.const_data_ptr<int64_t>(), locations_c.const_data_ptr<scalar_t>(),
        weights_c.const_data_ptr<scalar_t>(), grad_output_c.const_data_ptr<scalar_t>(),
        grad_value.mutable_data_ptr<scalar_t>(), grad_locations.mutable_data_ptr<scalar_t>(),
        grad_weights.mutable_data_ptr<scalar_t>(), s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace focus_detr
