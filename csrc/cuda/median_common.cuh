// The median's device-side basics (design §3), for the other median_*.cuh and median_cuda.cu:
// the CUDA-specific tuning constants, keys, the per-problem device state (Control) and the
// power-of-two scaling of nk/median_plan.h read from that state.
//
// Included by median_cuda.cu only: the median's kernels are templates instantiated by its
// launch sequence, all in that one translation unit (no -rdc), hence internal linkage here.
#pragma once

#include <math.h>

#include "nk/median_plan.h"
#include "nk_cuda_common.cuh"

namespace nk_cuda {
namespace {

// Tuning of the CUDA kernels; the sample, the window, the direct/GEMM threshold and the scaling
// are nk/median_plan.h, shared with the CPU kernel.
constexpr int kTile = 64;        // side of a block tile of pairs
constexpr int kTileK = 16;       // features per shared-memory stage
constexpr int kMicro = 4;        // each of the 16 x 16 threads computes kMicro x kMicro pairs
constexpr int kPad = 4;          // shared row padding (keeps 16-byte alignment)
// Radix digit width: 2048 bins, 8 KiB of shared counters next to the tile stages (the CPU's
// 16-bit digits would not fit a block's shared memory).
constexpr int kDigitBits = 11;
constexpr int kBins = 1 << kDigitBits;
// Problems with at most kKeepAll pairs keep every key (when they fit the budget). Tuned per
// backend (CPU: 2^18): here the keys go to a preallocated buffer and radix passes select.
constexpr int64_t kKeepAll = int64_t{1} << 22;
constexpr int64_t kTileGridMax = 8192;   // blocks of a tile pass (they loop over the tiles)
constexpr int64_t kHistGridMax = 2048;   // blocks of a histogram pass over a key buffer
// A block flushes its 32-bit shared histogram every kFlushTiles tiles (at most 2^30 keys).
constexpr int64_t kFlushTiles = int64_t{1} << 18;

static_assert(kTile == 16 * kMicro, "16 x 16 threads of kMicro x kMicro pairs");
static_assert(kThreads == 256, "the tile kernels assume 256 threads");

enum Mode : int { kKeepAllMode = 0, kWindowMode = 1, kRadixMode = 2 };

// ---- keys ------------------------------------------------------------------------------------

template <typename W> struct KeyOf;
template <> struct KeyOf<float> { using type = unsigned int; };
template <> struct KeyOf<double> { using type = unsigned long long; };
template <typename W> using KeyT = typename KeyOf<W>::type;

__device__ __forceinline__ unsigned int key_of(float v) {
  return v > 0.0f ? __float_as_uint(v) : 0u;  // negative, -0 (and NaN) -> +0
}
__device__ __forceinline__ unsigned long long key_of(double v) {
  return v > 0.0 ? static_cast<unsigned long long>(__double_as_longlong(v)) : 0ull;
}
__device__ __forceinline__ float value_of(unsigned int k) { return __uint_as_float(k); }
__device__ __forceinline__ double value_of(unsigned long long k) {
  return __longlong_as_double(static_cast<long long>(k));
}

// Bits of |v| (non-negative, so they order like the values), zero-extended.
__device__ __forceinline__ unsigned long long abs_bits(float v) { return __float_as_uint(fabsf(v)); }
__device__ __forceinline__ unsigned long long abs_bits(double v) {
  return static_cast<unsigned long long>(__double_as_longlong(fabs(v)));
}

__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }

// ---- per-problem device state ----------------------------------------------------------------

// One radix selection: the digits fixed so far and the rank left among the keys matching them.
template <typename K>
struct Radix {
  K prefix;
  long long rank;
  int active;  // 0: the kernels of this selection return at once
};

template <typename K>
struct Control {
  unsigned long long absmax;  // bits of max |coordinate| in W (zero-extended for float)
  unsigned long long below;   // window pass: keys < lo
  unsigned long long inside;  // window pass: keys in [lo, hi]; the append cursor
  K lo, hi;                   // window bounds (0 and ~0 unless the sample selections set them)
  K answer;                   // key of rank k, valid when done
  int nonfinite;              // NaN or Inf in the problem's input
  int done;                   // answer found
  Radix<K> sel;
};

// The largest |coordinate| as a value of W, from the bits stats_kernel keeps in Control::absmax.
__device__ __forceinline__ float absmax_value(float, unsigned long long bits) {
  return __uint_as_float(static_cast<unsigned int>(bits));
}
__device__ __forceinline__ double absmax_value(double, unsigned long long bits) {
  return __longlong_as_double(static_cast<long long>(bits));
}

// Exponent e of the problem's scale (nk::scale_exponent): coordinates are multiplied by 2^-e,
// the result scaled back by 2^e (nk::pow2, exact).
template <typename W>
__device__ __forceinline__ int scale_exponent(unsigned long long absmax_bits) {
  return nk::scale_exponent<W>(absmax_value(W(0), absmax_bits));
}

}  // namespace
}  // namespace nk_cuda
