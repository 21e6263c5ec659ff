// The deterministic three-way inner product over two lists of tensors, shared by multi_dot
// (aw_cpu.cpp) and iga_ratio (iga_cpu.cpp): (<a,a>, <b,b>, <a,b>) in float64.
//
// The flat element sequence of all positions is cut into fixed chunks (kChunk); each chunk's
// three sums go into its own slot of a buffer, and the slots are added in chunk order. Within a
// chunk, contiguous runs use four interleaved accumulators (lane = offset in the run mod 4),
// combined as (l0 + l1) + (l2 + l3). Nothing depends on the thread count or timing.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <array>
#include <vector>

#include "nk_cpu_utils.h"

namespace nk_cpu {

template <typename T>
void dots_chunk(const ListPlan& plan, int64_t c, double* res) {
  double aa = 0, bb = 0, ab = 0;
  for_chunk<T>(plan, c, kChunk, [&](int, T* const* p, const int64_t* st, int64_t n) {
    const T* x = p[0];
    const T* y = p[1];
    if (st[0] == 1 && st[1] == 1) {
      double a4[4] = {0, 0, 0, 0}, b4[4] = {0, 0, 0, 0}, c4[4] = {0, 0, 0, 0};
      int64_t j = 0;
      for (; j + 4 <= n; j += 4) {
        for (int k = 0; k < 4; ++k) {
          const double xv = static_cast<double>(x[j + k]);
          const double yv = static_cast<double>(y[j + k]);
          a4[k] += xv * xv;
          b4[k] += yv * yv;
          c4[k] += xv * yv;
        }
      }
      for (int k = 0; j < n; ++j, ++k) {
        const double xv = static_cast<double>(x[j]);
        const double yv = static_cast<double>(y[j]);
        a4[k] += xv * xv;
        b4[k] += yv * yv;
        c4[k] += xv * yv;
      }
      aa += (a4[0] + a4[1]) + (a4[2] + a4[3]);
      bb += (b4[0] + b4[1]) + (b4[2] + b4[3]);
      ab += (c4[0] + c4[1]) + (c4[2] + c4[3]);
    } else {
      const int64_t sx = st[0], sy = st[1];
      double a1 = 0, b1 = 0, c1 = 0;
      for (int64_t j = 0; j < n; ++j) {
        const double xv = static_cast<double>(x[j * sx]);
        const double yv = static_cast<double>(y[j * sy]);
        a1 += xv * xv;
        b1 += yv * yv;
        c1 += xv * yv;
      }
      aa += a1;
      bb += b1;
      ab += c1;
    }
  });
  res[0] = aa;
  res[1] = bb;
  res[2] = ab;
}

// (<a,a>, <b,b>, <a,b>) in float64, bit-identical for any thread count.
inline std::array<double, 3> list_dots(at::TensorList a, at::TensorList b) {
  const ListPlan plan = make_plan({a, b});
  std::vector<double> part(static_cast<size_t>(plan.nchunks) * 3, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a[0].scalar_type(), "dots_cpu", [&] {
    parallel_chunks(plan.nchunks, [&](int64_t c) { dots_chunk<scalar_t>(plan, c, &part[c * 3]); });
  });
  std::array<double, 3> total{0, 0, 0};
  for (int64_t c = 0; c < plan.nchunks; ++c) {
    for (int k = 0; k < 3; ++k) total[k] += part[c * 3 + k];
  }
  return total;
}

// Math/result dtype of the reductions: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType reduce_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace nk_cpu
