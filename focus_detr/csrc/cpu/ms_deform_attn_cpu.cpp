// CPU kernels of multi-scale deformable attention.
//
// Forward: parallel over (batch, query); every (query, head) row of the output is owned by one
// thread. Backward: grad_value rows of head h are only written by the samples of head h, so the
// work is split over (batch, head) and needs no atomics. When there are fewer (batch, head)
// pairs than threads, the queries of each pair are split into chunks that accumulate into
// private buffers, summed afterwards. The channel loops run over contiguous memory and are
// written so that the compiler vectorises them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ms_deform_attn.h"

namespace focus_detr {

namespace {

struct Level {
  int64_t height;
  int64_t width;
  int64_t start;
};

// Reads spatial_shapes / level_start_index and checks that every level lies inside value.
std::vector<Level> read_levels(
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    int64_t num_values) {
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const int64_t* shape_data = shapes.data_ptr<int64_t>();
  const int64_t* start_data = starts.data_ptr<int64_t>();
  std::vector<Level> levels(shapes.size(0));
  for (size_t l = 0; l < levels.size(); ++l) {
    levels[l] = Level{shape_data[2 * l], shape_data[2 * l + 1], start_data[l]};
    const auto& level = levels[l];
    TORCH_CHECK(
        level.height >= 0 && level.width >= 0 && level.start >= 0 &&
            level.start + level.height * level.width <= num_values,
        "ms_deform_attn: level ",
        l,
        " of shape (",
        level.height,
        ", ",
        level.width,
        ") starting at ",
        level.start,
        " does not fit in value of length ",
        num_values);
  }
  return levels;
}

// Bilinear footprint of one sample: the four neighbouring cells (y0x0, y0x1, y1x0, y1x1) as row
// indices inside the level (-1 when outside) and their interpolation weights.
template <typename scalar_t>
struct Footprint {
  int64_t index[4];
  scalar_t weight[4];
  scalar_t fx;
  scalar_t fy;
};

// Returns false when the sample touches no cell (all four corners are outside the level).
template <typename scalar_t>
inline bool footprint(
    scalar_t loc_x,
    scalar_t loc_y,
    const Level& level,
    Footprint<scalar_t>& out) {
  // align_corners=False: the centre of cell j is at (j + 0.5) / size.
  const scalar_t x = loc_x * static_cast<scalar_t>(level.width) - scalar_t(0.5);
  const scalar_t y = loc_y * static_cast<scalar_t>(level.height) - scalar_t(0.5);
  // Written so that NaN locations are skipped too.
  if (!(x >= scalar_t(-1) && y >= scalar_t(-1) && x < static_cast<scalar_t>(level.width) &&
        y < static_cast<scalar_t>(level.height))) {
    return false;
  }
  const scalar_t x_floor = std::floor(x);
  const scalar_t y_floor = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(x_floor);
  const int64_t y0 = static_cast<int64_t>(y_floor);
  const scalar_t fx = x - x_floor;
  const scalar_t fy = y - y_floor;
  out.fx = fx;
  out.fy = fy;
  out.weight[0] = (1 - fx) * (1 - fy);
  out.weight[1] = fx * (1 - fy);
  out.weight[2] = (1 - fx) * fy;
  out.weight[3] = fx * fy;
  const bool x0_in = x0 >= 0;
  const bool x1_in = x0 + 1 < level.width;
  const bool y0_in = y0 >= 0;
  const bool y1_in = y0 + 1 < level.height;
  const int64_t row0 = y0 * level.width;
  const int64_t row1 = row0 + level.width;
  out.index[0] = (y0_in && x0_in) ? row0 + x0 : -1;
  out.index[1] = (y0_in && x1_in) ? row0 + x0 + 1 : -1;
  out.index[2] = (y1_in && x0_in) ? row1 + x0 : -1;
  out.index[3] = (y1_in && x1_in) ? row1 + x0 + 1 : -1;
  return true;
}

// out[c] += sum_k w_k * row_k[c]
template <typename scalar_t>
inline void accumulate_corners(
    scalar_t* __restrict__ out,
    const scalar_t* __restrict__ row0,
    const scalar_t* __restrict__ row1,
    const scalar_t* __restrict__ row2,
    const scalar_t* __restrict__ row3,
    const scalar_t (&w)[4],
    int64_t channels) {
  const scalar_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) {
    out[c] += w0 * row0[c] + w1 * row1[c] + w2 * row2[c] + w3 * row3[c];
  }
}

// dot[k] = <grad, row_k>; grad_row_k[c] += w_k * grad[c]
template <typename scalar_t>
inline void corners_backward(
    const scalar_t* __restrict__ grad,
    const scalar_t* __restrict__ row0,
    const scalar_t* __restrict__ row1,
    const scalar_t* __restrict__ row2,
    const scalar_t* __restrict__ row3,
    scalar_t* __restrict__ grad_row0,
    scalar_t* __restrict__ grad_row1,
    scalar_t* __restrict__ grad_row2,
    scalar_t* __restrict__ grad_row3,
    const scalar_t (&w)[4],
    scalar_t (&dot)[4],
    int64_t channels) {
  const scalar_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  scalar_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t g = grad[c];
    s0 += g * row0[c];
    s1 += g * row1[c];
    s2 += g * row2[c];
    s3 += g * row3[c];
    grad_row0[c] += w0 * g;
    grad_row1[c] += w1 * g;
    grad_row2[c] += w2 * g;
    grad_row3[c] += w3 * g;
  }
  dot[0] = s0;
  dot[1] = s1;
  dot[2] = s2;
  dot[3] = s3;
}

template <typename scalar_t>
void forward_kernel(
    const MsdaSizes& s,
    const std::vector<Level>& levels,
    const scalar_t* value,
    const scalar_t* locations,
    const scalar_t* weights,
    scalar_t* output) {
  const int64_t heads = s.num_heads, channels = s.head_dim, points = s.num_points;
  const int64_t row_stride = heads * channels;  // between two cells of value
  const int64_t samples_per_head = s.num_levels * points;
  const int64_t tasks = s.batch * s.num_queries;
  const int64_t work_per_task = std::max<int64_t>(1, heads * samples_per_head * channels);
  const int64_t grain = std::max<int64_t>(1, 16384 / work_per_task);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    const std::vector<scalar_t> zeros(channels, scalar_t(0));
    for (int64_t task = begin; task < end; ++task) {
      const scalar_t* value_b = value + (task / s.num_queries) * s.num_values * row_stride;
      for (int64_t h = 0; h < heads; ++h) {
        scalar_t* out = output + (task * heads + h) * channels;
        std::fill(out, out + channels, scalar_t(0));
        const int64_t first_sample = (task * heads + h) * samples_per_head;
        for (int64_t l = 0; l < s.num_levels; ++l) {
          const Level& level = levels[l];
          const scalar_t* value_level = value_b + level.start * row_stride + h * channels;
          for (int64_t p = 0; p < points; ++p) {
            const int64_t sample = first_sample + l * points + p;
            Footprint<scalar_t> fp;
            if (!footprint(locations[2 * sample], locations[2 * sample + 1], level, fp)) {
              continue;
            }
            const scalar_t attention = weights[sample];
            const scalar_t* rows[4];
            scalar_t w[4];
            for (int k = 0; k < 4; ++k) {
              const bool inside = fp.index[k] >= 0;
              rows[k] = inside ? value_level + fp.index[k] * row_stride : zeros.data();
              w[k] = inside ? attention * fp.weight[k] : scalar_t(0);
            }
            accumulate_corners(out, rows[0], rows[1], rows[2], rows[3], w, channels);
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(
    const MsdaSizes& s,
    const std::vector<Level>& levels,
    const scalar_t* value,
    const scalar_t* locations,
    const scalar_t* weights,
    const scalar_t* grad_output,
    scalar_t* grad_value,
    scalar_t* grad_locations,
    scalar_t* grad_weights) {
  const int64_t heads = s.num_heads, channels = s.head_dim, points = s.num_points;
  const int64_t row_stride = heads * channels;
  const int64_t samples_per_head = s.num_levels * points;
  const int64_t groups = s.batch * heads;
  const int64_t threads = at::get_num_threads();
  // Split the queries of each (batch, head) only when the pairs cannot keep every thread busy.
  int64_t chunks = groups >= threads ? 1 : (threads + groups - 1) / groups;
  chunks = std::max<int64_t>(1, std::min(chunks, s.num_queries));
  const int64_t chunk_queries = (s.num_queries + chunks - 1) / chunks;
  const int64_t value_size = s.num_values * channels;  // one head of one image
  // Private buffers of the query chunks (uninitialised: each task zeroes its own).
  auto partial_buffer = at::empty(
      {chunks > 1 ? groups * chunks * value_size : 0}, c10::CppTypeToScalarType<scalar_t>::value);
  scalar_t* partial = partial_buffer.template mutable_data_ptr<scalar_t>();

  at::parallel_for(0, groups * chunks, 1, [&](int64_t begin, int64_t end) {
    const std::vector<scalar_t> zeros(channels, scalar_t(0));
    std::vector<scalar_t> scratch(4 * channels);  // write target of corners outside the level
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / chunks, chunk = task % chunks;
      const int64_t b = group / heads, h = group % heads;
      const scalar_t* value_bh = value + b * s.num_values * row_stride + h * channels;
      scalar_t* grad_bh;
      int64_t grad_stride;
      if (chunks == 1) {
        grad_bh = grad_value + b * s.num_values * row_stride + h * channels;
        grad_stride = row_stride;
      } else {
        grad_bh = partial + task * value_size;
        grad_stride = channels;
        std::fill(grad_bh, grad_bh + value_size, scalar_t(0));
      }
      const int64_t q_end = std::min(s.num_queries, (chunk + 1) * chunk_queries);
      for (int64_t q = chunk * chunk_queries; q < q_end; ++q) {
        const int64_t row = (b * s.num_queries + q) * heads + h;
        const scalar_t* grad = grad_output + row * channels;
        for (int64_t l = 0; l < s.num_levels; ++l) {
          const Level& level = levels[l];
          const scalar_t* value_level = value_bh + level.start * row_stride;
          scalar_t* grad_level = grad_bh + level.start * grad_stride;
          for (int64_t p = 0; p < points; ++p) {
            const int64_t sample = row * samples_per_head + l * points + p;
            Footprint<scalar_t> fp;
            if (!footprint(locations[2 * sample], locations[2 * sample + 1], level, fp)) {
              grad_weights[sample] = 0;
              grad_locations[2 * sample] = 0;
              grad_locations[2 * sample + 1] = 0;
              continue;
            }
            const scalar_t attention = weights[sample];
            const scalar_t* rows[4];
            scalar_t* grad_rows[4];
            scalar_t w[4];
            for (int k = 0; k < 4; ++k) {
              const bool inside = fp.index[k] >= 0;
              rows[k] = inside ? value_level + fp.index[k] * row_stride : zeros.data();
              grad_rows[k] = inside ? grad_level + fp.index[k] * grad_stride
                                    : scratch.data() + k * channels;
              w[k] = inside ? attention * fp.weight[k] : scalar_t(0);
            }
            scalar_t dot[4];
            corners_backward(
                grad, rows[0], rows[1], rows[2], rows[3], grad_rows[0], grad_rows[1],
                grad_rows[2], grad_rows[3], w, dot, channels);
            const scalar_t fx = fp.fx, fy = fp.fy;
            grad_weights[sample] = fp.weight[0] * dot[0] + fp.weight[1] * dot[1] +
                fp.weight[2] * dot[2] + fp.weight[3] * dot[3];
            // d(sample)/d(loc_x) = width * d(sample)/dx, likewise for y.
            grad_locations[2 * sample] = attention * static_cast<scalar_t>(level.width) *
                ((1 - fy) * (dot[1] - dot[0]) + fy * (dot[3] - dot[2]));
            grad_locations[2 * sample + 1] = attention * static_cast<scalar_t>(level.height) *
                ((1 - fx) * (dot[2] - dot[0]) + fx * (dot[3] - dot[1]));
          }
        }
      }
    }
  });

  if (chunks > 1) {
    // grad_value[b, v, h, :] = sum over chunks of the private buffers.
    const int64_t cells = s.batch * s.num_values;
    at::parallel_for(0, cells, 256, [&](int64_t begin, int64_t end) {
      for (int64_t cell = begin; cell < end; ++cell) {
        const int64_t b = cell / s.num_values, v = cell % s.num_values;
        for (int64_t h = 0; h < heads; ++h) {
          scalar_t* __restrict__ out = grad_value + (cell * heads + h) * channels;
          const scalar_t* first = partial + (b * heads + h) * chunks * value_size;
          std::fill(out, out + channels, scalar_t(0));
          for (int64_t k = 0; k < chunks; ++k) {
            const scalar_t* __restrict__ part = first + k * value_size + v * channels;
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) {
              out[c] += part[c];
            }
          }
        }
      }
    });
  }
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  const MsdaSizes s = check_ms_deform_attn_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
      at::Tensor());
  const auto levels = read_levels(spatial_shapes, level_start_index, s.num_values);
  const auto value_c = value.contiguous();
  const auto locations_c = sampling_locations.contiguous();
  const auto weights_c = attention_weights.contiguous();
  auto output = at::empty({s.batch, s.num_queries, s.num_heads * s.head_dim}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(
        s, levels, value_c.const_data_ptr<scalar_t>(), locations_c.const_data_ptr<scalar_t>(),
        weights_c.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>());
  });
  return output;
}

GradTriple ms_deform_attn_backward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output) {
  const MsdaSizes s = check_ms_deform_attn_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
      grad_output);
  const auto levels = read_levels(spatial_shapes, level_start_index, s.num_values);
  const auto value_c = value.contiguous();
  const auto locations_c = sampling_locations.contiguous();
  const auto weights_c = attention_weights.contiguous();
  const auto grad_output_c = grad_output.contiguous();
  // Cells that no sample touches keep a zero gradient.
  auto grad_value = at::zeros_like(value_c);
  auto grad_locations = at::empty_like(locations_c);
  auto grad_weights = at::empty_like(weights_c);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    backward_kernel<scalar_t>(
        s, levels, value_c.const_data_ptr<scalar_t>(), locations_c.const_data_ptr<scalar_t>(),
        weights_c.const_data_ptr<scalar_t>(), grad_output_c.const_data_ptr<scalar_t>(),
        grad_value.mutable_data_ptr<scalar_t>(), grad_locations.mutable_data_ptr<scalar_t>(),
        grad_weights.mutable_data_ptr<scalar_t>());
  });
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace focus_detr
