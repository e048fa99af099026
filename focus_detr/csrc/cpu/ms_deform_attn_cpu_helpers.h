// Helpers of the CPU kernels of multi-scale deformable attention: level table, bilinear
// footprint of a sample, and the vectorised channel loops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace focus_detr {
namespace cpu {

struct Level {
  int64_t height;
  int64_t width;
  int64_t start;
};

// Reads spatial_shapes / level_start_index and checks that every level lies inside value.
inline std::vector<Level> read_levels(
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

// loc * size - 0.5 rounded after the product and after the difference, as PyTorch computes it
// in ms_deform_attn_reference.py: on targets with fused multiply-adds the compiler could
// otherwise contract it, and the test of footprint() could then differ from the reference's at
// the level borders. (The volatile store only costs a few cycles per sample.)
template <typename scalar_t>
inline scalar_t scaled_location(scalar_t loc, int64_t size) {
  volatile scalar_t product = loc * static_cast<scalar_t>(size);
  return product - scalar_t(0.5);
}

// Returns false when the sample touches no cell of its level: -1 <= x < width and
// -1 <= y < height fail, which NaN, +-inf and huge locations fail too. Such a sample contributes
// nothing and gets zero gradients (ms_deform_attn_reference.py computes the same test).
template <typename scalar_t>
inline bool footprint(
    scalar_t loc_x,
    scalar_t loc_y,
    const Level& level,
    Footprint<scalar_t>& out) {
  // align_corners=False: the centre of cell j is at (j + 0.5) / size.
  const scalar_t x = scaled_location(loc_x, level.width);
  const scalar_t y = scaled_location(loc_y, level.height);
  // The range test comes before any conversion to an integer: past it x and y are finite and
  // in [-1, size), so the int64 corner indices below cannot overflow.
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

// The attention weight a sample is multiplied by: NaN when it is not finite, so that a NaN or
// infinite weight gives NaN in every order of evaluation (inf * 0 and inf - inf are NaN, but
// inf * (w0 * v0 + w1 * v1) and inf * w0 * v0 + inf * w1 * v1 may differ).
template <typename scalar_t>
inline scalar_t finite_or_nan(scalar_t weight) {
  return std::isfinite(weight) ? weight : std::numeric_limits<scalar_t>::quiet_NaN();
}

#if defined(__GNUC__)
// 16-byte vectors of GCC / Clang (SSE2 / NEON registers): with them the sums of a block of
// channels stay in registers; a plain array of sums gets unrolled into scalars or spilled.
template <typename scalar_t>
struct Vector16 {
  typedef scalar_t type __attribute__((vector_size(16)));
};

template <typename scalar_t>
inline typename Vector16<scalar_t>::type load16(const scalar_t* data) {
  typename Vector16<scalar_t>::type v;
  std::memcpy(&v, data, sizeof(v));  // unaligned load
  return v;
}

template <typename scalar_t>
inline void store16(scalar_t* data, const typename Vector16<scalar_t>::type& v) {
  std::memcpy(data, &v, sizeof(v));
}

// Sums kVectors consecutive vectors of channels, starting at channel c, over all rows.
template <int kVectors, typename scalar_t>
inline void weighted_row_block(
    const scalar_t* const* rows,
    const scalar_t* weights,
    int64_t count,
    int64_t c,
    scalar_t* __restrict__ out) {
  using V = typename Vector16<scalar_t>::type;
  constexpr int64_t n = sizeof(V) / sizeof(scalar_t);
  V acc[kVectors];
#pragma GCC unroll 8
  for (int k = 0; k < kVectors; ++k) {
    acc[k] = V{};
  }
  for (int64_t j = 0; j < count; ++j) {
    const scalar_t* row = rows[j] + c;
    const V w = V{} + weights[j];
#pragma GCC unroll 8
    for (int k = 0; k < kVectors; ++k) {
      acc[k] += w * load16(row + k * n);
    }
  }
#pragma GCC unroll 8
  for (int k = 0; k < kVectors; ++k) {
    store16(out + c + k * n, acc[k]);
  }
}
#endif

// out[c] = sum_j weights[j] * rows[j][c]. The channels go in blocks of up to 128 bytes whose
// sums stay in registers while the rows are walked, so out is written once.
template <typename scalar_t>
inline void weighted_row_sum(
    const scalar_t* const* rows,
    const scalar_t* weights,
    int64_t count,
    int64_t channels,
    scalar_t* __restrict__ out) {
  int64_t c = 0;
#if defined(__GNUC__)
  constexpr int64_t n = 16 / sizeof(scalar_t);  // lanes of a vector
  for (; c + 8 * n <= channels; c += 8 * n) {
    weighted_row_block<8>(rows, weights, count, c, out);
  }
  if (c + 4 * n <= channels) {
    weighted_row_block<4>(rows, weights, count, c, out);
    c += 4 * n;
  }
  if (c + 2 * n <= channels) {
    weighted_row_block<2>(rows, weights, count, c, out);
    c += 2 * n;
  }
  if (c + n <= channels) {
    weighted_row_block<1>(rows, weights, count, c, out);
    c += n;
  }
#endif
  if (c < channels) {
    std::fill(out + c, out + channels, scalar_t(0));
    for (int64_t j = 0; j < count; ++j) {
      const scalar_t* __restrict__ row = rows[j];
      const scalar_t w = weights[j];
      for (int64_t t = c; t < channels; ++t) {
        out[t] += w * row[t];
      }
    }
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

}  // namespace cpu
}  // namespace focus_detr
