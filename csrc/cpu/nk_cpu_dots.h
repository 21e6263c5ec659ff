// The two list kernels shared by aw_cpu.cpp and iga_cpu.cpp:
//  * list_dots: the deterministic three-way inner product (<a,a>, <b,b>, <a,b>) in float64, for
//    multi_dot and iga_ratio (which skips the <b,b> it does not use);
//  * combine_lists: out[p] = wa * a[p] + wb * b[p], for aw_combine_ and iga_correction_.
//
// The flat element sequence of all positions is cut into fixed chunks (kChunk); each chunk's
// sums go into its own slot of a buffer, and the slots are added in chunk order. Within a chunk,
// every element is converted to float64 (exact) and its products are formed and summed in float64
// (a float32 x float32 product is exact in float64; the sums round in float64 only). Contiguous
// runs use kDotLanes = 16 interleaved accumulators per sum (lane = offset in the run mod 16; the
// lanes carry over from one run of the chunk to the next), folded at the end of the chunk as a
// fixed binary tree (lane k += lane k + w for w = 8, 4, 2, 1); strided runs add into lane 0.
// The 16 lanes are four 4-double blocks, computed with AVX (one register per block), SSE2 (two)
// or plain C++ (four scalars): every lane sees the same float64 operations in the same order, no
// multiply-add is contracted, so the bits do not depend on the instruction set. Nothing depends on
// the thread count or timing.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <array>
#include <type_traits>
#include <vector>

#if defined(__AVX__) || defined(__SSE2__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "nk/overlap.h"
#include "nk_cpu_utils.h"

namespace nk_cpu {

// Four float64 lanes: the unit of the dot kernels' accumulators.
#if defined(__AVX__)
struct D4 {
  __m256d v;
  static D4 zero() { return {_mm256_setzero_pd()}; }
  static D4 load(const float* p) { return {_mm256_cvtps_pd(_mm_loadu_ps(p))}; }
  static D4 load(const double* p) { return {_mm256_loadu_pd(p)}; }
  void store(double* p) const { _mm256_storeu_pd(p, v); }
  friend D4 operator*(D4 a, D4 b) { return {_mm256_mul_pd(a.v, b.v)}; }
  friend D4 operator+(D4 a, D4 b) { return {_mm256_add_pd(a.v, b.v)}; }
};
#elif defined(__SSE2__) || defined(_M_X64)
struct D4 {
  __m128d lo, hi;
  static D4 zero() { return {_mm_setzero_pd(), _mm_setzero_pd()}; }
  static D4 load(const float* p) {
    const __m128 f = _mm_loadu_ps(p);
    return {_mm_cvtps_pd(f), _mm_cvtps_pd(_mm_movehl_ps(f, f))};
  }
  static D4 load(const double* p) { return {_mm_loadu_pd(p), _mm_loadu_pd(p + 2)}; }
  void store(double* p) const {
    _mm_storeu_pd(p, lo);
    _mm_storeu_pd(p + 2, hi);
  }
  friend D4 operator*(D4 a, D4 b) { return {_mm_mul_pd(a.lo, b.lo), _mm_mul_pd(a.hi, b.hi)}; }
  friend D4 operator+(D4 a, D4 b) { return {_mm_add_pd(a.lo, b.lo), _mm_add_pd(a.hi, b.hi)}; }
};
#else
struct D4 {
  double v[4];
  static D4 zero() { return {{0, 0, 0, 0}}; }
  template <typename U>
  static D4 load(const U* p) {
    return {{static_cast<double>(p[0]), static_cast<double>(p[1]), static_cast<double>(p[2]),
             static_cast<double>(p[3])}};
  }
  void store(double* p) const {
    for (int k = 0; k < 4; ++k) p[k] = v[k];
  }
  friend D4 operator*(D4 a, D4 b) {
    return {{a.v[0] * b.v[0], a.v[1] * b.v[1], a.v[2] * b.v[2], a.v[3] * b.v[3]}};
  }
  friend D4 operator+(D4 a, D4 b) {
    return {{a.v[0] + b.v[0], a.v[1] + b.v[1], a.v[2] + b.v[2], a.v[3] + b.v[3]}};
  }
};
#endif

constexpr int kDotLanes = 16;  // 4 blocks of D4

// Read-ahead distance of the contiguous dot loop, in elements of U (1 KiB: 2 KiB served
// multi_dot as well but left the lighter iga_ratio loop ~10% slower on one core).
constexpr int64_t kPrefetchBytes = 1024;
template <typename U>
constexpr int64_t kPrefetch = kPrefetchBytes / static_cast<int64_t>(sizeof(U));

inline void prefetch(const void* p) {
#if defined(__AVX__) || defined(__SSE2__) || defined(_M_X64)
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
#elif defined(__GNUC__)
  __builtin_prefetch(p);
#else
  (void)p;
#endif
}

// One chunk's lane accumulators: lanes[s][k], s = 0 <a,a>, 1 <b,b>, 2 <a,b>.
struct DotLanes {
  alignas(64) double lanes[3][kDotLanes];
};

// A contiguous run of n elements added into the lanes (element j into lane j mod 16), four
// elements at a time as D4 blocks. float16/bfloat16 blocks are first widened to float (exact).
template <bool kBB, typename T>
inline void dots_run(DotLanes& L, const T* x, const T* y, int64_t n) {
  using U = std::conditional_t<std::is_same_v<T, double>, double, float>;
  int64_t j = 0;
  if (n >= kDotLanes) {
    D4 a[4], b[4], c[4];
    for (int q = 0; q < 4; ++q) {
      a[q] = D4::load(&L.lanes[0][4 * q]);
      b[q] = kBB ? D4::load(&L.lanes[1][4 * q]) : D4::zero();
      c[q] = D4::load(&L.lanes[2][4 * q]);
    }
    for (; j + kDotLanes <= n; j += kDotLanes) {
      const U* xs;
      const U* ys;
      U xb[kDotLanes], yb[kDotLanes];
      if constexpr (std::is_same_v<T, U>) {
        xs = x + j;
        ys = y + j;
        // Software prefetch kPrefetchBytes ahead (one line per 64 bytes of each stream): on its
        // own the hardware prefetcher left one core ~20% under its streaming read rate.
        if (j + kPrefetch<U> < n) {
          for (int q = 0; q < kDotLanes * static_cast<int>(sizeof(U)) / 64; ++q) {
            prefetch(xs + kPrefetch<U> + q * (64 / sizeof(U)));
            prefetch(ys + kPrefetch<U> + q * (64 / sizeof(U)));
          }
        }
      } else {
        for (int k = 0; k < kDotLanes; ++k) {
          xb[k] = static_cast<U>(x[j + k]);
          yb[k] = static_cast<U>(y[j + k]);
        }
        xs = xb;
        ys = yb;
      }
      for (int q = 0; q < 4; ++q) {
        const D4 xv = D4::load(xs + 4 * q);
        const D4 yv = D4::load(ys + 4 * q);
        a[q] = a[q] + xv * xv;
        if constexpr (kBB) b[q] = b[q] + yv * yv;
        c[q] = c[q] + xv * yv;
      }
    }
    for (int q = 0; q < 4; ++q) {
      a[q].store(&L.lanes[0][4 * q]);
      if constexpr (kBB) b[q].store(&L.lanes[1][4 * q]);
      c[q].store(&L.lanes[2][4 * q]);
    }
  }
  // j is 0 or a multiple of kDotLanes here, and n - j < kDotLanes: lanes 0, 1, ... in turn.
  for (int k = 0; j < n; ++j, ++k) {
    const double xv = static_cast<double>(x[j]);
    const double yv = static_cast<double>(y[j]);
    L.lanes[0][k] += xv * xv;
    if constexpr (kBB) L.lanes[1][k] += yv * yv;
    L.lanes[2][k] += xv * yv;
  }
}

// The sums of chunk c into res[0..2] (res[1] = 0 without kBB).
template <bool kBB, typename T>
void dots_chunk(const ListPlan& plan, int64_t c, double* res) {
  DotLanes L;
  for (int s = 0; s < 3; ++s) {
    for (int k = 0; k < kDotLanes; ++k) L.lanes[s][k] = 0;
  }
  for_chunk<T>(plan, c, kChunk, [&](int, T* const* p, const int64_t* st, int64_t n) {
    const T* x = p[0];
    const T* y = p[1];
    if (st[0] == 1 && st[1] == 1) {
      dots_run<kBB>(L, x, y, n);
    } else {
      const int64_t sx = st[0], sy = st[1];
      for (int64_t j = 0; j < n; ++j) {
        const double xv = static_cast<double>(x[j * sx]);
        const double yv = static_cast<double>(y[j * sy]);
        L.lanes[0][0] += xv * xv;
        if constexpr (kBB) L.lanes[1][0] += yv * yv;
        L.lanes[2][0] += xv * yv;
      }
    }
  });
  for (int w = kDotLanes / 2; w >= 1; w /= 2) {
    for (int s = 0; s < 3; ++s) {
      for (int k = 0; k < w; ++k) L.lanes[s][k] += L.lanes[s][k + w];
    }
  }
  res[0] = L.lanes[0][0];
  res[1] = L.lanes[1][0];
  res[2] = L.lanes[2][0];
}

// (<a,a>, <b,b>, <a,b>) in float64, bit-identical for any thread count. Without kBB the <b,b>
// pass is skipped and total[1] is 0 (iga_ratio); the other two sums are the same bits either way.
template <bool kBB = true>
inline std::array<double, 3> list_dots(at::TensorList a, at::TensorList b) {
  const ListPlan plan = make_plan({a, b});
  std::array<double, 3> total{0, 0, 0};
  if (plan.nchunks == 1) {  // one chunk: no buffer, no parallel region
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a[0].scalar_type(), "dots_cpu", [&] {
      dots_chunk<kBB, scalar_t>(plan, 0, total.data());
    });
    return total;
  }
  std::vector<double> part(static_cast<size_t>(plan.nchunks) * 3, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a[0].scalar_type(), "dots_cpu", [&] {
    parallel_chunks(plan.nchunks,
                    [&](int64_t c) { dots_chunk<kBB, scalar_t>(plan, c, &part[c * 3]); });
  });
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
