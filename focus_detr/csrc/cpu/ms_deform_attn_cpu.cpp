// CPU kernels of multi-scale deformable attention.
//
// Forward: parallel over (batch, query); every (query, head) row of the output is owned by one
// thread. Backward: grad_value rows of head h are only written by the samples of head h, so the
// work is split over (batch, head) and needs no atomics. When there are fewer (batch, head)
// pairs than threads, the queries of each pair are split into chunks that accumulate into
// private buffers, summed afterwards. The channel loops (ms_deform_attn_cpu_helpers.h) run over
// contiguous memory in vector registers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_cpu_helpers.h"

namespace focus_detr {

namespace {

using cpu::corners_backward;
using cpu::finite_or_nan;
using cpu::footprint;
using cpu::Footprint;
using cpu::Level;
using cpu::read_levels;
using cpu::weighted_row_sum;

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
    // The cells touched by the samples of one (query, head) and their weights (attention times
    // bilinear weight); cells outside the levels are left out.
    std::vector<const scalar_t*> rows(4 * samples_per_head);
    std::vector<scalar_t> row_weights(4 * samples_per_head);
    for (int64_t task = begin; task < end; ++task) {
      const scalar_t* value_b = value + (task / s.num_queries) * s.num_values * row_stride;
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t first_sample = (task * heads + h) * samples_per_head;
        int64_t count = 0;
        for (int64_t l = 0; l < s.num_levels; ++l) {
          const Level& level = levels[l];
          const scalar_t* value_level = value_b + level.start * row_stride + h * channels;
          for (int64_t p = 0; p < points; ++p) {
            const int64_t sample = first_sample + l * points + p;
            Footprint<scalar_t> fp;
            if (!footprint(locations[2 * sample], locations[2 * sample + 1], level, fp)) {
              continue;
            }
            const scalar_t attention = finite_or_nan(weights[sample]);
            for (int k = 0; k < 4; ++k) {
              if (fp.index[k] >= 0) {
                rows[count] = value_level + fp.index[k] * row_stride;
                row_weights[count] = attention * fp.weight[k];
                ++count;
              }
            }
          }
        }
        weighted_row_sum(
            rows.data(), row_weights.data(), count, channels,
            output + (task * heads + h) * channels);
      }
    }
  });
}

// Number of chunks the queries of every (batch, head) pair are split into in the backward pass.
// at::parallel_for gives every thread a contiguous range of ceil(tasks / threads) tasks: pick the
// number of chunks that balances the threads best, preferring fewer chunks, since every chunk
// beyond the first costs a private copy of grad_value (bytes_per_chunk, capped at 256 MiB).
int64_t query_chunks(
    int64_t groups,
    int64_t threads,
    int64_t num_queries,
    int64_t bytes_per_chunk) {
  if (groups <= 0 || threads <= 1 || num_queries <= 1) {
    return 1;
  }
  int64_t max_chunks = std::min(num_queries, (2 * threads + groups - 1) / groups);
  max_chunks = std::min(max_chunks, (int64_t(256) << 20) / std::max<int64_t>(1, bytes_per_chunk));
  int64_t best = 1;
  double best_balance = 0;
  for (int64_t chunks = 1; chunks <= max_chunks; ++chunks) {
    const int64_t tasks = groups * chunks;
    const int64_t per_thread = (tasks + threads - 1) / threads;
    // fraction of the threads' time spent working
    const double balance = static_cast<double>(tasks) / static_cast<double>(per_thread * threads);
    if (balance > best_balance + 1e-9) {
      best = chunks;
      best_balance = balance;
    }
  }
  return best;
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
  const int64_t value_size = s.num_values * channels;  // one head of one image
  const int64_t chunks = query_chunks(
      groups, at::get_num_threads(), s.num_queries, groups * value_size * sizeof(scalar_t));
  const int64_t chunk_queries = (s.num_queries + chunks - 1) / chunks;
  // Private buffers of the query chunks (uninitialised: each thread zeroes its own).
  auto partial_buffer = at::empty(
      {chunks > 1 ? groups * chunks * value_size : 0}, c10::CppTypeToScalarType<scalar_t>::value);
  scalar_t* partial = partial_buffer.template mutable_data_ptr<scalar_t>();

  at::parallel_for(0, groups * chunks, 1, [&](int64_t begin, int64_t end) {
    const std::vector<scalar_t> zeros(channels, scalar_t(0));
    std::vector<scalar_t> scratch(4 * channels);  // write target of corners outside the level
    if (chunks > 1) {
      std::fill(partial + begin * value_size, partial + end * value_size, scalar_t(0));
    }
    // Queries of one block are done for all the (batch, head) pairs of this thread before the
    // next block: the heads of one query sample the same cells, which are then in cache.
    constexpr int64_t kQueryBlock = 16;
    for (int64_t block = 0; block < s.num_queries; block += kQueryBlock) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t group = task / chunks, chunk = task % chunks;
        const int64_t q_begin = std::max(block, chunk * chunk_queries);
        const int64_t q_end = std::min(
            {s.num_queries, block + kQueryBlock, (chunk + 1) * chunk_queries});
        if (q_begin >= q_end) {
          continue;
        }
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
        }
        for (int64_t q = q_begin; q < q_end; ++q) {
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
              const scalar_t attention = finite_or_nan(weights[sample]);
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
