// The two list kernels shared by aw_cpu.cpp and iga_cpu.cpp:
//  * list_dots: the deterministic three-way inner product (<a,a>, <b,b>, <a,b>) in float64, for
//    multi_dot and iga_ratio;
//  * combine_lists: out[p] = wa * a[p] + wb * b[p], for aw_combine_ and iga_correction_.
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

#include "nk/overlap.h"
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

// out[p] = wa * a[p] + wb * b[p] elementwise over lists, in the math type (the weights rounded to
// it first, as the references' w.to(acc)). out[p] may be a[p] or b[p] itself; any other overlap
// of an input with an output gets a private copy of that input first.
inline void combine_lists(at::TensorList out, at::TensorList a_in, at::TensorList b_in,
                          double wa_value, double wb_value) {
  const std::vector<at::Tensor> a = nk::safe_inputs(out, a_in);
  const std::vector<at::Tensor> b = nk::safe_inputs(out, b_in);
  const ListPlan plan = make_plan({out, a, b});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out[0].scalar_type(), "combine", [&] {
    using A = acc_t<scalar_t>;
    const A wa = static_cast<A>(wa_value);
    const A wb = static_cast<A>(wb_value);
    parallel_chunks(plan.nchunks, [&](int64_t c) {
      for_chunk<scalar_t>(plan, c, kChunk,
                          [&](int, scalar_t* const* p, const int64_t* st, int64_t n) {
        scalar_t* o = p[0];
        const scalar_t* x = p[1];
        const scalar_t* y = p[2];
        if (st[0] == 1 && st[1] == 1 && st[2] == 1) {
          for (int64_t j = 0; j < n; ++j) {
            o[j] = static_cast<scalar_t>(wa * static_cast<A>(x[j]) + wb * static_cast<A>(y[j]));
          }
        } else {
          const int64_t so = st[0], sx = st[1], sy = st[2];
          for (int64_t j = 0; j < n; ++j) {
            o[j * so] = static_cast<scalar_t>(wa * static_cast<A>(x[j * sx]) +
                                              wb * static_cast<A>(y[j * sy]));
          }
        }
      });
    });
  });
}

}  // namespace nk_cpu
