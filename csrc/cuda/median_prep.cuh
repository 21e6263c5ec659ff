// The median's per-problem kernels other than the tile and selection passes (design §3): init
// (clear the device state), stats (max |coordinate|, non-finite flag), colsum and mean (the
// centre), centre (scaled and centred copies and row norms), sample (window mode's sampled pair
// keys), and finalize (the result from the selected key).
//
// Included by median_cuda.cu only (see median_common.cuh).
#pragma once

#include "median_common.cuh"

namespace nk_cuda {
namespace {

// ---- init, statistics, centring --------------------------------------------------------------

template <typename K>
__global__ void __launch_bounds__(kThreads) init_kernel(Control<K>* __restrict__ ctl,
                                                        unsigned long long* __restrict__ hist) {
  if (threadIdx.x == 0) {
    ctl->absmax = 0;
    ctl->below = 0;
    ctl->inside = 0;
    ctl->lo = 0;
    ctl->hi = static_cast<K>(~K(0));
    ctl->answer = 0;
    ctl->nonfinite = 0;
    ctl->done = 0;
    ctl->sel.prefix = 0;
    ctl->sel.rank = 0;
    ctl->sel.active = 0;
  }
  for (int b = threadIdx.x; b < kBins; b += kThreads) hist[b] = 0;
}

// Max |coordinate| and the non-finite flag over x (nx elements) and y (ny, may be 0).
template <typename T, typename K>
__global__ void __launch_bounds__(kThreads) stats_kernel(const T* __restrict__ x, int64_t nx,
                                                         const T* __restrict__ y, int64_t ny,
                                                         Control<K>* __restrict__ ctl) {
  unsigned long long big = 0;
  int bad = 0;
  const int64_t total = nx + ny;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const acc_t<T> v = to_acc(idx < nx ? x[idx] : y[idx - nx]);
    if (isfinite(v)) {
      const unsigned long long b = abs_bits(v);
      big = b > big ? b : big;
    } else {
      bad = 1;
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    const unsigned long long o = __shfl_xor_sync(0xffffffffu, big, off);
    big = o > big ? o : big;
    bad |= __shfl_xor_sync(0xffffffffu, bad, off);
  }
  if ((threadIdx.x & 31) == 0) {
    if (big != 0) atomicMax(&ctl->absmax, big);
    if (bad) atomicExch(&ctl->nonfinite, 1);
  }
}

// partials[c * d + f] = sum over the rows of chunk c (rows_per_chunk rows of x then y, as one
// sequence of n + m rows) of W(row[f]) * 2^-e, in float64 and a fixed order. Block: 32 features
// x 8 row lanes; grid (ceil(d / 32), chunks).
template <typename T, typename K>
__global__ void __launch_bounds__(kThreads) colsum_kernel(const T* __restrict__ x, int64_t n,
                                                          const T* __restrict__ y, int64_t m,
                                                          int64_t d, int64_t rows_per_chunk,
                                                          const Control<K>* __restrict__ ctl,
                                                          double* __restrict__ partials) {
  using W = acc_t<T>;
  if (ctl->nonfinite) return;
  const W down = nk::pow2(W(0), -scale_exponent<W>(ctl->absmax));
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int64_t f = static_cast<int64_t>(blockIdx.x) * 32 + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < n + m ? r0 + rows_per_chunk : n + m;
  double s = 0;
  if (f < d) {
    for (int64_t r = r0 + ty; r < r1; r += 8) {
      const T v = r < n ? x[r * d + f] : y[(r - n) * d + f];
      s += static_cast<double>(mul_rn(to_acc(v), down));
    }
  }
  __shared__ double part[8][32];
  part[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && f < d) {
    double t = part[0][tx];
    for (int q = 1; q < 8; ++q) t += part[q][tx];
    partials[static_cast<int64_t>(blockIdx.y) * d + f] = t;
  }
}

template <typename W, typename K>
__global__ void __launch_bounds__(kThreads) mean_kernel(const double* __restrict__ partials,
                                                        int64_t chunks, int64_t d, int64_t rows,
                                                        const Control<K>* __restrict__ ctl,
                                                        W* __restrict__ centre) {
  if (ctl->nonfinite) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t f = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; f < d;
       f += stride) {
    double s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += partials[c * d + f];
    centre[f] = static_cast<W>(s / static_cast<double>(rows));
  }
}

// One warp per row of x (rows 0..n-1) then y (n..n+m-1): the scaled and centred copy in W
// (a for x, b for y) and the squared norm of the row (norms[row]), summed with FMAs per lane
// and a fixed xor tree (every lane ends with the same bits).
template <typename T, typename K>
__global__ void __launch_bounds__(kThreads) centre_kernel(
    const T* __restrict__ x, int64_t n, const T* __restrict__ y, int64_t m, int64_t d,
    const Control<K>* __restrict__ ctl, const acc_t<T>* __restrict__ centre,
    acc_t<T>* __restrict__ a, acc_t<T>* __restrict__ b, acc_t<T>* __restrict__ norms) {
  using W = acc_t<T>;
  if (ctl->nonfinite) return;
  const W down = nk::pow2(W(0), -scale_exponent<W>(ctl->absmax));
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
       r < n + m; r += warps) {
    const T* src = r < n ? x + r * d : y + (r - n) * d;
    W* dst = r < n ? a + r * d : b + (r - n) * d;
    W s = 0;
    for (int64_t f = lane; f < d; f += 32) {
      const W v = sub_rn(mul_rn(to_acc(src[f]), down), centre[f]);
      dst[f] = v;
      s = fma_rn(v, v, s);
    }
    for (int off = 16; off > 0; off >>= 1) s = add_rn(s, __shfl_xor_sync(0xffffffffu, s, off));
    if (lane == 0) norms[r] = s;
  }
}

// ---- sample ----------------------------------------------------------------------------------

// Sample s: pair (i, j) from two splitmix64 outputs of the counter 2s+1, 2s+2 (pairwise: i != j,
// uniform over unordered pairs); squared distance summed directly, one warp per pair.
template <typename W>
__global__ void __launch_bounds__(kThreads) sample_kernel(
    const W* __restrict__ a, const W* __restrict__ b, int64_t n, int64_t m, int64_t d,
    int pairwise, int64_t count, const Control<KeyT<W>>* __restrict__ ctl,
    KeyT<W>* __restrict__ keys) {
  if (ctl->nonfinite) return;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
       s < count; s += warps) {
    const unsigned long long u = static_cast<unsigned long long>(s);
    const unsigned long long i =
        nk::splitmix64_mix(nk::kSampleSeed + (2 * u + 1) * nk::kSplitmixGamma) %
        static_cast<unsigned long long>(n);
    unsigned long long j =
        nk::splitmix64_mix(nk::kSampleSeed + (2 * u + 2) * nk::kSplitmixGamma) %
        static_cast<unsigned long long>(pairwise ? n - 1 : m);
    if (pairwise && j >= i) ++j;
    const W* u_row = a + static_cast<int64_t>(i) * d;
    const W* v_row = b + static_cast<int64_t>(j) * d;
    W acc = 0;
    for (int64_t f = lane; f < d; f += 32) {
      const W diff = sub_rn(u_row[f], v_row[f]);
      acc = fma_rn(diff, diff, acc);
    }
    for (int off = 16; off > 0; off >>= 1) acc = add_rn(acc, __shfl_xor_sync(0xffffffffu, acc, off));
    if (lane == 0) keys[s] = key_of(acc);
  }
}

// ---- result ----------------------------------------------------------------------------------

template <typename T>
__global__ void finalize_kernel(const Control<KeyT<acc_t<T>>>* __restrict__ ctl, int squared,
                                T* __restrict__ out) {
  using W = acc_t<T>;
  W r;
  if (ctl->nonfinite || !ctl->done) {
    r = static_cast<W>(NAN);
  } else {
    const W v = value_of(ctl->answer);
    const W up = nk::pow2(W(0), scale_exponent<W>(ctl->absmax));
    // Undo the scaling: exact, unless the true value lies beyond the dtype's range.
    r = squared ? mul_rn(mul_rn(v, up), up) : mul_rn(sqrt_rn(v), up);
  }
  *out = from_acc<T>(r);
}

}  // namespace
}  // namespace nk_cuda
