// The parts of the median's plan (design §3) that the CPU kernel (csrc/cpu/median_cpu.cpp) and the
// CUDA kernels (csrc/cuda/median_*.cu*) share: pair count and rank, the direct / GEMM threshold,
// the power-of-two scaling exponent, the sample (size, generator) and the window around the
// sample quantile. Plain scalar math, no torch headers: included by .cu files. What differs by
// backend (keep-all threshold, kept-key capacity, digit width, tiles) stays in the backend.
#pragma once

#include <math.h>
#include <stdint.h>

#include "nk/host_device.h"

namespace nk {

// Up to this many features, squared distances are summed directly from the differences (exact
// for data whose differences and squares are exact, and faster than a GEMM whose inner dimension
// is tiny); above it, as (|a|^2 + |b|^2) - 2<a, b>.
constexpr int64_t kDirectMaxD = 16;

// Window mode samples n_pairs / kSampleDivisor pairs, clamped to [kSampleMin, kSampleMax]. On the
// CPU a sampled pair costs about as much as ~30 pairs of a tile (a gathered row pair against a
// GEMM), so the sample is ~6% of the pass.
constexpr int64_t kSampleDivisor = 512;
constexpr int64_t kSampleMin = 8192;
constexpr int64_t kSampleMax = int64_t{1} << 20;

// splitmix64 (Steele, Lea, Flood 2014), which draws the sampled pairs: output t = 1, 2, ... of the
// sequence is splitmix64_mix(kSampleSeed + t * kSplitmixGamma). Fixed seed: the sample depends
// on the shapes only.
constexpr uint64_t kSampleSeed = 0x6e6b5f6d65646961ULL;
constexpr uint64_t kSplitmixGamma = 0x9e3779b97f4a7c15ULL;

// Half-width of the window, in quantiles: kWindowSigmas standard deviations of the sample
// quantile, sqrt(q (1 - q) / S), plus kWindowSlack / S.
constexpr double kWindowSigmas = 6.0;
constexpr double kWindowSlack = 2.0;
// Floor of q (1 - q) in that standard deviation, so a quantile near 0 or 1 keeps a window.
constexpr double kMinQuantileVariance = 1e-3;
// The window is tried only when its expected kept keys (2 margin n_pairs) are at most this
// fraction of the kept-key capacity.
constexpr double kWindowFill = 0.5;

// Largest |e| of the scale 2^e of a problem's coordinates, per work type W (float or double):
// clamped so that 2^-e and 2^e are normal.
template <typename W>
struct ScaleExpMax;
template <>
struct ScaleExpMax<float> {
  static constexpr int value = 96;
};
template <>
struct ScaleExpMax<double> {
  static constexpr int value = 768;
};

// Pairs of a problem: i < j among n rows (pairwise), or every row of n with every row of m
// (cross). n (n - 1) / 2 is formed without overflowing before the division.
NK_HOST_DEVICE inline int64_t pair_count(bool pairwise, int64_t n, int64_t m) {
  if (!pairwise) return n * m;
  return n % 2 == 0 ? (n / 2) * (n - 1) : n * ((n - 1) / 2);
}

// Rank of the lower median among n_pairs values: (n_pairs - 1) // 2 (0 when there are none).
NK_HOST_DEVICE inline int64_t median_rank(int64_t n_pairs) {
  return n_pairs > 0 ? (n_pairs - 1) / 2 : 0;
}

NK_HOST_DEVICE inline int frexp_exponent(float v) {
  int e = 0;
  frexpf(v, &e);
  return e;
}
NK_HOST_DEVICE inline int frexp_exponent(double v) {
  int e = 0;
  frexp(v, &e);
  return e;
}

// Exponent e of the exact power-of-two scale of a problem whose largest |coordinate| is absmax
// (finite, >= 0, a value of W): absmax < 2^e (frexp's exponent; 0 for absmax = 0), clamped to
// +-ScaleExpMax<W>. Coordinates are multiplied by 2^-e, the result scaled back by 2^e.
template <typename W>
NK_HOST_DEVICE inline int scale_exponent(W absmax) {
  constexpr int bound = ScaleExpMax<W>::value;
  const int e = frexp_exponent(absmax);
  return e < -bound ? -bound : (e > bound ? bound : e);
}

// 2^e in W, exactly (e within +-ScaleExpMax<W>, so 2^e is normal): built from its exponent bits
// on the device, by ldexp on the host (the same value).
NK_HOST_DEVICE inline float pow2(float, int e) {
#if defined(__CUDA_ARCH__)
  return __int_as_float((127 + e) << 23);
#else
  return ldexpf(1.0f, e);
#endif
}
NK_HOST_DEVICE inline double pow2(double, int e) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(1023 + e) << 52);
#else
  return ldexp(1.0, e);
#endif
}

// The output function of splitmix64.
NK_HOST_DEVICE inline uint64_t splitmix64_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Sampled pairs of window mode for a problem of n_pairs pairs.
inline int64_t sample_count(int64_t n_pairs) {
  const int64_t s = n_pairs / kSampleDivisor;
  return s < kSampleMin ? kSampleMin : (s > kSampleMax ? kSampleMax : s);
}

// The window of window mode. Rank k sits at quantile q = k / (n_pairs - 1) of the pairs; the
// sample's q-quantile is off by about sd = sqrt(q (1 - q) / S) of the ranks, so the window spans
// the sample ranks of q +- margin, margin = 6 sd + 2 / S. Its bounds are the keys of sample ranks
// lo_rank and hi_rank (-1: open on that side, lo = 0 or hi = the largest key).
struct MedianWindow {
  int64_t samples = 0;  // S
  double margin = 0;    // half-width, in quantiles
  int64_t lo_rank = -1;
  int64_t hi_rank = -1;
  bool fits = false;    // expected kept keys within kWindowFill of `capacity`: worth a try
};

// n_pairs >= 2, k = median_rank(n_pairs); capacity: kept keys the backend can hold.
inline MedianWindow median_window(int64_t n_pairs, int64_t k, int64_t capacity) {
  MedianWindow w;
  const int64_t S = sample_count(n_pairs);
  const double s = static_cast<double>(S);
  const double q = static_cast<double>(k) / static_cast<double>(n_pairs - 1);
  const double var = q * (1 - q);
  w.samples = S;
  w.margin = kWindowSigmas * sqrt((var < kMinQuantileVariance ? kMinQuantileVariance : var) / s) +
             kWindowSlack / s;
  const double lo_pos = floor((q - w.margin) * static_cast<double>(S - 1));
  const double hi_pos = ceil((q + w.margin) * static_cast<double>(S - 1));
  w.lo_rank = lo_pos > 0 ? static_cast<int64_t>(lo_pos) : -1;
  w.hi_rank = hi_pos < static_cast<double>(S - 1) ? static_cast<int64_t>(hi_pos) : -1;
  w.fits = 2.0 * w.margin * static_cast<double>(n_pairs) <=
           kWindowFill * static_cast<double>(capacity);
  return w;
}

}  // namespace nk
