// CUDA kernels of design §3: the exact lower median of pairwise (or cross) Euclidean distances,
// without the N x N matrix. The algorithm family of csrc/cpu/median_cpu.cpp, with every decision
// that depends on data taken on the device, so that the launch sequence is a function of the
// shapes, the dtype and the budget only (no host synchronization: CUDA-graph capturable).
//
// Per problem (batch element), one after the other on the stream, reusing one workspace:
//
//  init      one block: clears the problem's Control (flags, counts, window bounds, selection
//            state) and the global digit histogram.
//  stats     max |coordinate| (atomicMax on the bit pattern: order-free, deterministic) and the
//            non-finite flag, over x (and y).
//  colsum    column sums of the scaled coordinates in float64, per chunk of rows (fixed order);
//  mean      the centre: chunk sums added in order, / rows, rounded to the work type W.
//  centre    a = W(x) * 2^-e - centre (and b for y); one warp per row, which also gives the row's
//            squared norm (fixed shuffle tree) for the GEMM form.
//  [window mode]
//  sample    S independent pairs from a counter-based splitmix64 (fixed seed, so the sample
//            depends on the shapes only), their squared distances summed directly, one warp per
//            pair; two radix selections over the S keys give the window bounds lo and hi.
//  window    one pass over the tiles: keys < lo are counted (int64), keys in [lo, hi] appended
//            to the kept-key buffer through an atomic cursor (the cursor keeps counting past the
//            capacity, so the count is exact either way).
//  check     one thread: rank k inside the window and the kept keys within capacity -> arm the
//            selection of rank k - below among them; lo == hi -> the answer is lo; else nothing
//            (the fallback will run).
//  select    radix passes over the kept keys (11-bit digits, histogram + scan kernel per pass).
//  [keep-all mode: the window pass with lo = 0, hi = max keeps every key.]
//  fallback  armed only if no answer yet: radix passes over recomputed tiles, each a histogram of
//            the next digit of the keys that match the prefix, fused into the tile epilogue; a
//            scan kernel fixes the digit and the remaining rank on the device. Every kernel of a
//            path reads the device flags first and returns at once when its path is not taken.
//  finalize  one thread: NaN for non-finite input, else the key's value scaled back by 2^e
//            (2^2e squared, after the square root otherwise), rounded to the element type.
//
// Distances. A thread computes a 4 x 4 block of pairs of a 64 x 64 block tile from shared-memory
// stages of 16 features, accumulating each pair's sum sequentially over the features with
// explicit fused multiply-adds (IEEE fp32, or fp64 for float64 inputs; no tensor cores, no TF32):
// GEMM form (|a|^2 + |b|^2) - 2<a, b> for d > 16, squared differences summed directly for d <= 16
// (as the CPU kernel). A pair's value therefore depends on its two rows only, not on the tiling
// or the launch shape: every recomputation is bit-identical.
//
// Keys: the IEEE bit pattern of the squared distance, negative values and -0 mapped to +0, so that
// keys order like values. All counts are 64-bit integers; shared-memory histograms are 32-bit per
// block and flushed to the global 64-bit histogram before they could overflow.
#include <math.h>

#include <algorithm>
#include <cmath>

#include "nk_cuda_common.cuh"

namespace nk_cuda {
namespace {

constexpr int kTile = 64;        // side of a block tile of pairs
constexpr int kTileK = 16;       // features per shared-memory stage
constexpr int kMicro = 4;        // each of the 16 x 16 threads computes kMicro x kMicro pairs
constexpr int kPad = 4;          // shared row padding (keeps 16-byte alignment)
constexpr int kDigitBits = 11;   // radix digit width: 2048 bins, 8 KiB of shared counters
constexpr int kBins = 1 << kDigitBits;
constexpr int64_t kDirectMaxD = 16;
constexpr int64_t kKeepAll = int64_t{1} << 22;
constexpr int64_t kSampleDivisor = 512;
constexpr int64_t kSampleMin = 8192;
constexpr int64_t kSampleMax = int64_t{1} << 20;
constexpr int64_t kTileGridMax = 8192;   // blocks of a tile pass (they loop over the tiles)
constexpr int64_t kHistGridMax = 2048;   // blocks of a histogram pass over a key buffer
// A block flushes its 32-bit shared histogram every kFlushTiles tiles (at most 2^30 keys).
constexpr int64_t kFlushTiles = int64_t{1} << 18;
constexpr unsigned long long kSeed = 0x6e6b5f6d65646961ULL;
constexpr unsigned long long kGamma = 0x9e3779b97f4a7c15ULL;

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

// Power-of-two exponent e with every |coordinate| < 2^e, clamped so 2^-e and 2^e are normal.
__device__ __forceinline__ int pow2_exponent(float, unsigned long long bits) {
  int e = 0;
  frexpf(__uint_as_float(static_cast<unsigned int>(bits)), &e);
  return e < -96 ? -96 : (e > 96 ? 96 : e);
}
__device__ __forceinline__ int pow2_exponent(double, unsigned long long bits) {
  int e = 0;
  frexp(__longlong_as_double(static_cast<long long>(bits)), &e);
  return e < -768 ? -768 : (e > 768 ? 768 : e);
}
// 2^e from its exponent bits (exact, e within the clamp above).
__device__ __forceinline__ float pow2(float, int e) { return __int_as_float((127 + e) << 23); }
__device__ __forceinline__ double pow2(double, int e) {
  return __longlong_as_double(static_cast<long long>(1023 + e) << 52);
}

__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

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
  const W down = pow2(W(0), -pow2_exponent(W(0), ctl->absmax));
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
  const W down = pow2(W(0), -pow2_exponent(W(0), ctl->absmax));
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
    const unsigned long long i = mix64(kSeed + (2 * u + 1) * kGamma) %
                                 static_cast<unsigned long long>(n);
    unsigned long long j = mix64(kSeed + (2 * u + 2) * kGamma) %
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

// ---- radix selection machinery ---------------------------------------------------------------

// Pass p of a selection over KB-bit keys: the digit is bits [shift, shift + width).
__host__ __device__ inline void digit_of_pass(int key_bits, int p, int* shift, int* width) {
  int s = key_bits - kDigitBits * (p + 1);
  *width = s < 0 ? kDigitBits + s : kDigitBits;
  *shift = s < 0 ? 0 : s;
}
inline int passes_for(int key_bits) { return (key_bits + kDigitBits - 1) / kDigitBits; }

// Keys whose bits above the digit differ from the selection's prefix are not counted.
template <typename K>
__device__ __forceinline__ K high_mask(int shift, int width) {
  constexpr int kb = 8 * static_cast<int>(sizeof(K));
  return shift + width >= kb ? K(0) : static_cast<K>(~K(0) << (shift + width));
}

// Adds a block's shared histogram to the global one and clears it. Call from every thread.
__device__ __forceinline__ void flush_hist(unsigned int* sh, unsigned long long* hist, int bins) {
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += kThreads) {
    const unsigned int v = sh[b];
    if (v != 0) {
      atomicAdd(&hist[b], static_cast<unsigned long long>(v));
      sh[b] = 0;
    }
  }
  __syncthreads();
}

// Arms the selection of `rank` (new prefix 0), unless the input is non-finite or (when
// `unless_done`) an answer exists already.
template <typename K>
__global__ void arm_kernel(Control<K>* __restrict__ ctl, long long rank, int unless_done) {
  const int active = !ctl->nonfinite && !(unless_done && ctl->done);
  ctl->sel.prefix = 0;
  ctl->sel.rank = rank;
  ctl->sel.active = active;
}

// Histogram of the digit of the keys of a buffer that match the prefix. The buffer holds
// `capacity` keys, of which min(*count, capacity) are valid (count null: all of them).
template <typename K>
__global__ void __launch_bounds__(kThreads) hist_keys_kernel(
    const K* __restrict__ keys, int64_t capacity, const unsigned long long* __restrict__ count,
    const Control<K>* __restrict__ ctl, int shift, int width,
    unsigned long long* __restrict__ hist) {
  if (!ctl->sel.active) return;
  __shared__ unsigned int sh[kBins];
  const int bins = 1 << width;
  for (int b = threadIdx.x; b < bins; b += kThreads) sh[b] = 0;
  __syncthreads();
  int64_t valid = capacity;
  if (count != nullptr && static_cast<unsigned long long>(capacity) > *count) {
    valid = static_cast<int64_t>(*count);
  }
  const K hmask = high_mask<K>(shift, width);
  const K hpre = ctl->sel.prefix & hmask;
  const K bmask = static_cast<K>(bins - 1);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < valid;
       idx += stride) {
    const K key = keys[idx];
    if ((key & hmask) == hpre) atomicAdd(&sh[static_cast<int>((key >> shift) & bmask)], 1u);
  }
  flush_hist(sh, hist, bins);
}

// One block: the digit whose cumulative count passes the rank; prefix and rank updated, the
// global histogram cleared for the next pass. On the last pass (dest non-null) the selected key
// goes to *dest, *done (if non-null) is set and the selection ends. A rank beyond the counts (an
// internal inconsistency) ends the selection without an answer, so the result becomes NaN
// rather than a wrong value. dest and done point into *ctl (no __restrict__ there).
template <typename K>
__global__ void __launch_bounds__(kThreads) scan_kernel(Control<K>* ctl, int shift, int width,
                                                        unsigned long long* __restrict__ hist,
                                                        K* dest, int* done) {
  if (!ctl->sel.active) return;
  const int bins = 1 << width;
  const int per = (bins + kThreads - 1) / kThreads;
  __shared__ unsigned long long sums[kThreads];
  unsigned long long s = 0;
  const int b0 = threadIdx.x * per;
  for (int b = b0; b < b0 + per && b < bins; ++b) s += hist[b];
  sums[threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long rank = static_cast<unsigned long long>(ctl->sel.rank);
    int digit = -1;
    for (int t = 0; t < kThreads && digit < 0; ++t) {
      if (rank < sums[t]) {
        for (int b = t * per; b < t * per + per && b < bins; ++b) {
          const unsigned long long c = hist[b];
          if (rank < c) {
            digit = b;
            break;
          }
          rank -= c;
        }
      } else {
        rank -= sums[t];
      }
    }
    if (digit < 0) {
      ctl->sel.active = 0;
    } else {
      const K prefix = ctl->sel.prefix | static_cast<K>(static_cast<K>(digit) << shift);
      ctl->sel.prefix = prefix;
      ctl->sel.rank = static_cast<long long>(rank);
      if (dest != nullptr) {
        *dest = prefix;
        if (done != nullptr) *done = 1;
        ctl->sel.active = 0;
      }
    }
  }
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += kThreads) hist[b] = 0;
}

// After the window pass: rank k inside [below, below + inside) and the kept keys within the
// capacity -> arm the selection of rank k - below among them; all kept keys equal (lo == hi)
// -> the answer is lo. Otherwise nothing: the fallback runs.
template <typename K>
__global__ void window_check_kernel(Control<K>* __restrict__ ctl, long long k, long long capacity) {
  ctl->sel.active = 0;
  if (ctl->nonfinite) return;
  const unsigned long long below = ctl->below, inside = ctl->inside;
  const unsigned long long kk = static_cast<unsigned long long>(k);
  if (kk < below || kk - below >= inside) return;  // the window missed rank k
  if (ctl->lo == ctl->hi) {
    ctl->answer = ctl->lo;
    ctl->done = 1;
    return;
  }
  if (inside > static_cast<unsigned long long>(capacity)) return;  // kept keys overflowed
  ctl->sel.prefix = 0;
  ctl->sel.rank = static_cast<long long>(kk - below);
  ctl->sel.active = 1;
}

// ---- distance tiles --------------------------------------------------------------------------

template <typename W>
struct TileArgs {
  const W* a;   // (n, d) scaled, centred
  const W* b;   // (m, d); a itself for the pairwise form
  const W* na;  // (n,) squared norms (GEMM form)
  const W* nb;  // (m,)
  int64_t n, m, d;
  int64_t nbj;     // block tiles per row of tiles
  int64_t ntiles;  // block tiles in all (a rectangle; the pairwise form skips those below)
  int pairwise;
};

template <typename W>
struct TileSmem {
  W a[kTileK][kTile + kPad];
  W b[kTileK][kTile + kPad];
};

// The squared distances of this thread's kMicro x kMicro pairs of block tile (i0, j0): rows
// i0 + ty * 4 + r, columns j0 + tx * 4 + c. Each pair's sum runs over the features in order with
// one FMA per feature (direct form: per squared difference), whatever the tile's position, so a
// pair's value is the same in every pass. Rows or columns past the end hold garbage (masked by
// the caller). Contains __syncthreads: call from every thread.
template <typename W, bool DIRECT>
__device__ __forceinline__ void tile_distances(const TileArgs<W>& t, int64_t i0, int64_t j0,
                                               TileSmem<W>& sm, W (&sq)[kMicro][kMicro]) {
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int lk = threadIdx.x & 15, lr = threadIdx.x >> 4;
  W acc[kMicro][kMicro];
#pragma unroll
  for (int r = 0; r < kMicro; ++r)
#pragma unroll
    for (int c = 0; c < kMicro; ++c) acc[r][c] = W(0);
  for (int64_t k0 = 0; k0 < t.d; k0 += kTileK) {
    const int64_t kf = k0 + lk;
#pragma unroll
    for (int q = 0; q < kMicro; ++q) {
      const int row = lr + 16 * q;
      const int64_t i = i0 + row, j = j0 + row;
      sm.a[lk][row] = (i < t.n && kf < t.d) ? t.a[i * t.d + kf] : W(0);
      sm.b[lk][row] = (j < t.m && kf < t.d) ? t.b[j * t.d + kf] : W(0);
    }
    __syncthreads();
    const int kn = t.d - k0 < kTileK ? static_cast<int>(t.d - k0) : kTileK;  // block-uniform
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      if (kk < kn) {
        W ar[kMicro], br[kMicro];
#pragma unroll
        for (int r = 0; r < kMicro; ++r) ar[r] = sm.a[kk][ty * kMicro + r];
#pragma unroll
        for (int c = 0; c < kMicro; ++c) br[c] = sm.b[kk][tx * kMicro + c];
#pragma unroll
        for (int r = 0; r < kMicro; ++r)
#pragma unroll
          for (int c = 0; c < kMicro; ++c) {
            if (DIRECT) {
              const W diff = sub_rn(ar[r], br[c]);
              acc[r][c] = fma_rn(diff, diff, acc[r][c]);
            } else {
              acc[r][c] = fma_rn(ar[r], br[c], acc[r][c]);
            }
          }
      }
    }
    __syncthreads();
  }
  if (DIRECT) {
#pragma unroll
    for (int r = 0; r < kMicro; ++r)
#pragma unroll
      for (int c = 0; c < kMicro; ++c) sq[r][c] = acc[r][c];
  } else {
    W ni[kMicro], nj[kMicro];
#pragma unroll
    for (int r = 0; r < kMicro; ++r) {
      const int64_t i = i0 + ty * kMicro + r;
      ni[r] = i < t.n ? t.na[i] : W(0);
    }
#pragma unroll
    for (int c = 0; c < kMicro; ++c) {
      const int64_t j = j0 + tx * kMicro + c;
      nj[c] = j < t.m ? t.nb[j] : W(0);
    }
#pragma unroll
    for (int r = 0; r < kMicro; ++r)
#pragma unroll
      for (int c = 0; c < kMicro; ++c) {
        sq[r][c] = sub_rn(add_rn(ni[r], nj[c]), mul_rn(W(2), acc[r][c]));
      }
  }
}

// Which of this thread's pairs exist: i < n, j < m and, pairwise, j > i. Bit r * kMicro + c.
template <typename W>
__device__ __forceinline__ unsigned int valid_pairs(const TileArgs<W>& t, int64_t i0, int64_t j0) {
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  unsigned int mask = 0;
#pragma unroll
  for (int r = 0; r < kMicro; ++r)
#pragma unroll
    for (int c = 0; c < kMicro; ++c) {
      const int64_t i = i0 + ty * kMicro + r, j = j0 + tx * kMicro + c;
      const bool ok = i < t.n && j < t.m && (!t.pairwise || j > i);
      mask |= ok ? 1u << (r * kMicro + c) : 0u;
    }
  return mask;
}

// Block tile `tile` of the rectangle; false for tiles entirely below the diagonal (pairwise).
template <typename W>
__device__ __forceinline__ bool tile_origin(const TileArgs<W>& t, int64_t tile, int64_t* i0,
                                            int64_t* j0) {
  const int64_t ib = tile / t.nbj, jb = tile - ib * t.nbj;
  *i0 = ib * kTile;
  *j0 = jb * kTile;
  return !(t.pairwise && jb < ib);
}

// Window pass: counts the keys below lo, appends those in [lo, hi] to kept[] (capacity keys) at
// an atomic cursor (one atomic per warp and tile; the cursor counts past the capacity).
template <typename W, bool DIRECT>
__global__ void __launch_bounds__(kThreads) window_pass_kernel(
    TileArgs<W> t, Control<KeyT<W>>* __restrict__ ctl, KeyT<W>* __restrict__ kept,
    int64_t capacity) {
  using K = KeyT<W>;
  if (ctl->nonfinite) return;
  __shared__ TileSmem<W> sm;
  const K lo = ctl->lo;
  const K span = static_cast<K>(ctl->hi - lo);
  const int lane = threadIdx.x & 31;
  unsigned long long below = 0;
  for (int64_t tile = blockIdx.x; tile < t.ntiles; tile += gridDim.x) {  // uniform per block
    int64_t i0, j0;
    if (!tile_origin(t, tile, &i0, &j0)) continue;
    W sq[kMicro][kMicro];
    tile_distances<W, DIRECT>(t, i0, j0, sm, sq);
    const unsigned int valid = valid_pairs(t, i0, j0);
    K keys[kMicro][kMicro];
    unsigned int in = 0;
#pragma unroll
    for (int r = 0; r < kMicro; ++r)
#pragma unroll
      for (int c = 0; c < kMicro; ++c) {
        const K key = key_of(sq[r][c]);
        keys[r][c] = key;
        const unsigned int bit = 1u << (r * kMicro + c);
        if (valid & bit) {
          below += key < lo ? 1u : 0u;
          in |= static_cast<K>(key - lo) <= span ? bit : 0u;
        }
      }
    // Warp-aggregated append: inclusive scan of the per-thread counts, one atomic per warp.
    const unsigned int cnt = static_cast<unsigned int>(__popc(in));
    unsigned int incl = cnt;
    for (int off = 1; off < 32; off <<= 1) {
      const unsigned int o = __shfl_up_sync(0xffffffffu, incl, off);
      if (lane >= off) incl += o;
    }
    const unsigned int total = __shfl_sync(0xffffffffu, incl, 31);
    if (total != 0) {  // warp-uniform
      unsigned long long base = 0;
      if (lane == 0) base = atomicAdd(&ctl->inside, static_cast<unsigned long long>(total));
      base = __shfl_sync(0xffffffffu, base, 0);
      unsigned long long pos = base + (incl - cnt);
#pragma unroll
      for (int r = 0; r < kMicro; ++r)
#pragma unroll
        for (int c = 0; c < kMicro; ++c) {
          if (in & (1u << (r * kMicro + c))) {
            if (pos < static_cast<unsigned long long>(capacity)) kept[pos] = keys[r][c];
            ++pos;
          }
        }
    }
  }
  for (int off = 16; off > 0; off >>= 1) below += __shfl_down_sync(0xffffffffu, below, off);
  if (lane == 0 && below != 0) atomicAdd(&ctl->below, below);
}

// Radix pass over recomputed tiles: histogram of the digit [shift, shift + width) of the keys
// matching the selection's prefix, in shared memory, flushed to the global int64 histogram.
template <typename W, bool DIRECT>
__global__ void __launch_bounds__(kThreads) radix_pass_kernel(
    TileArgs<W> t, const Control<KeyT<W>>* __restrict__ ctl, int shift, int width,
    unsigned long long* __restrict__ hist) {
  using K = KeyT<W>;
  if (!ctl->sel.active) return;
  __shared__ TileSmem<W> sm;
  __shared__ unsigned int sh[kBins];
  const int bins = 1 << width;
  for (int b = threadIdx.x; b < bins; b += kThreads) sh[b] = 0;
  __syncthreads();
  const K hmask = high_mask<K>(shift, width);
  const K hpre = ctl->sel.prefix & hmask;
  const K bmask = static_cast<K>(bins - 1);
  int64_t since_flush = 0;
  for (int64_t tile = blockIdx.x; tile < t.ntiles; tile += gridDim.x) {  // uniform per block
    int64_t i0, j0;
    if (!tile_origin(t, tile, &i0, &j0)) continue;
    W sq[kMicro][kMicro];
    tile_distances<W, DIRECT>(t, i0, j0, sm, sq);
    const unsigned int valid = valid_pairs(t, i0, j0);
#pragma unroll
    for (int r = 0; r < kMicro; ++r)
#pragma unroll
      for (int c = 0; c < kMicro; ++c) {
        const K key = key_of(sq[r][c]);
        if ((valid & (1u << (r * kMicro + c))) && (key & hmask) == hpre) {
          atomicAdd(&sh[static_cast<int>((key >> shift) & bmask)], 1u);
        }
      }
    if (++since_flush == kFlushTiles) {
      flush_hist(sh, hist, bins);
      since_flush = 0;
    }
  }
  flush_hist(sh, hist, bins);
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
    const W up = pow2(W(0), pow2_exponent(W(0), ctl->absmax));
    // Undo the scaling: exact, unless the true value lies beyond the dtype's range.
    r = squared ? mul_rn(mul_rn(v, up), up) : mul_rn(sqrt_rn(v), up);
  }
  *out = from_acc<T>(r);
}

// ---- host plan -------------------------------------------------------------------------------

struct Plan {
  bool pairwise = true;
  int64_t n = 0, m = 0, d = 0, n_pairs = 0, k = 0;
  int work_bytes = 4, key_bytes = 4;
  Mode mode = kRadixMode;
  int64_t capacity = 0;           // kept keys the buffer holds
  int64_t samples = 0;            // window mode: sampled pairs
  int64_t lo_pos = -1, hi_pos = -1;  // their ranks that give lo and hi (-1: 0 / the max key)
  int64_t col_chunks = 1, rows_per_chunk = 1;
  int64_t off_ctl = 0, off_hist = 0, off_a = 0, off_b = 0, off_norms = 0, off_partials = 0,
          off_centre = 0, off_sample = 0, off_kept = 0, bytes = 0;
};

int64_t round_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

Plan make_plan(const MedianArgs& args) {
  Plan p;
  p.pairwise = args.y == nullptr;
  p.n = args.N;
  p.m = p.pairwise ? args.N : args.M;
  p.d = args.d;
  const bool f64 = args.dtype == DType::kDouble;
  p.work_bytes = f64 ? 8 : 4;
  p.key_bytes = f64 ? 8 : 4;
  if (p.pairwise) {
    p.n_pairs = p.n % 2 == 0 ? (p.n / 2) * (p.n - 1) : p.n * ((p.n - 1) / 2);
  } else {
    p.n_pairs = p.n * p.m;
  }
  p.k = p.n_pairs > 0 ? (p.n_pairs - 1) / 2 : 0;

  // Selection path (shapes and budget only). The kept-key buffer may use half of the budget.
  const int64_t budget_keys = std::max<int64_t>(args.memory_budget, 0) / 2 / p.key_bytes;
  if (p.n_pairs <= std::min(budget_keys, kKeepAll)) {
    p.mode = kKeepAllMode;
    p.capacity = p.n_pairs;
  } else if (p.n_pairs >= 2) {
    // As the CPU kernel: the sample's p-quantile is off by about sd = sqrt(p(1-p)/S) of the
    // ranks, so the window spans +-(6 sd + 2/S) around it; tried only when it should fit.
    const int64_t S = std::min(std::max(p.n_pairs / kSampleDivisor, kSampleMin), kSampleMax);
    const double q = static_cast<double>(p.k) / static_cast<double>(p.n_pairs - 1);
    const double margin = 6.0 * std::sqrt(std::max(q * (1 - q), 1e-3) / S) + 2.0 / S;
    if (2.0 * margin * static_cast<double>(p.n_pairs) <= 0.5 * static_cast<double>(budget_keys)) {
      p.mode = kWindowMode;
      p.samples = S;
      p.capacity = std::min(budget_keys, p.n_pairs);
      const double lo_pos = std::floor((q - margin) * static_cast<double>(S - 1));
      const double hi_pos = std::ceil((q + margin) * static_cast<double>(S - 1));
      p.lo_pos = lo_pos > 0 ? static_cast<int64_t>(lo_pos) : -1;
      p.hi_pos = hi_pos < static_cast<double>(S - 1) ? static_cast<int64_t>(hi_pos) : -1;
    }
  }

  // Column sums: chunks of rows, at most 1024 chunks and about 2^20 partial sums.
  const int64_t rows = p.n + (p.pairwise ? 0 : p.m);
  const int64_t max_chunks = std::max<int64_t>(1, std::min<int64_t>(1024, (int64_t{1} << 20) /
                                                                          std::max<int64_t>(p.d, 1)));
  p.col_chunks = std::min(std::max<int64_t>(1, (rows + 1023) / 1024), max_chunks);
  p.rows_per_chunk = (rows + p.col_chunks - 1) / p.col_chunks;

  int64_t off = 0;
  auto take = [&off](int64_t bytes) {
    const int64_t at = off;
    off = round_up(off + bytes, 256);
    return at;
  };
  p.off_ctl = take(static_cast<int64_t>(f64 ? sizeof(Control<unsigned long long>)
                                            : sizeof(Control<unsigned int>)));
  p.off_hist = take(kBins * 8);
  p.off_a = take(p.n * p.d * p.work_bytes);
  p.off_b = take(p.pairwise ? 0 : p.m * p.d * p.work_bytes);
  p.off_norms = take(rows * p.work_bytes);
  p.off_partials = take(p.col_chunks * p.d * 8);
  p.off_centre = take(p.d * p.work_bytes);
  p.off_sample = take(p.samples * p.key_bytes);
  p.off_kept = take(p.capacity * p.key_bytes);
  p.bytes = off;
  return p;
}

#define NK_TRY(expr)                            \
  do {                                          \
    const cudaError_t nk_err_ = (expr);         \
    if (nk_err_ != cudaSuccess) return nk_err_; \
  } while (0)

// The passes of one radix selection over a key buffer (count: valid keys on the device, or
// null); the last pass writes the key to *dest and sets *done (if non-null).
template <typename K>
cudaError_t select_in_buffer(const K* keys, int64_t capacity, const unsigned long long* count,
                             Control<K>* ctl, unsigned long long* hist, K* dest, int* done,
                             cudaStream_t stream) {
  constexpr int kb = 8 * static_cast<int>(sizeof(K));
  const int64_t blocks = std::min<int64_t>(std::max<int64_t>((capacity + kThreads - 1) / kThreads, 1),
                                           kHistGridMax);
  const int np = passes_for(kb);
  for (int pass = 0; pass < np; ++pass) {
    int shift, width;
    digit_of_pass(kb, pass, &shift, &width);
    hist_keys_kernel<K><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        keys, capacity, count, ctl, shift, width, hist);
    NK_TRY(cudaGetLastError());
    const bool last = pass == np - 1;
    scan_kernel<K><<<1, kThreads, 0, stream>>>(ctl, shift, width, hist, last ? dest : nullptr,
                                                last ? done : nullptr);
    NK_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

template <typename W, bool DIRECT>
cudaError_t tile_passes(const Plan& p, const TileArgs<W>& t, Control<KeyT<W>>* ctl,
                        unsigned long long* hist, KeyT<W>* kept, cudaStream_t stream) {
  using K = KeyT<W>;
  constexpr int kb = 8 * static_cast<int>(sizeof(K));
  const unsigned int grid = static_cast<unsigned int>(std::min(t.ntiles, kTileGridMax));
  if (p.mode != kRadixMode) {
    window_pass_kernel<W, DIRECT><<<grid, kThreads, 0, stream>>>(t, ctl, kept, p.capacity);
    NK_TRY(cudaGetLastError());
    window_check_kernel<K><<<1, 1, 0, stream>>>(ctl, p.k, p.capacity);
    NK_TRY(cudaGetLastError());
    NK_TRY(select_in_buffer<K>(kept, p.capacity, &ctl->inside, ctl, hist, &ctl->answer,
                               &ctl->done, stream));
  }
  // Fallback (and the radix-only path): armed only when no answer was found above.
  arm_kernel<K><<<1, 1, 0, stream>>>(ctl, p.k, 1);
  NK_TRY(cudaGetLastError());
  for (int pass = 0; pass < passes_for(kb); ++pass) {
    int shift, width;
    digit_of_pass(kb, pass, &shift, &width);
    radix_pass_kernel<W, DIRECT><<<grid, kThreads, 0, stream>>>(t, ctl, shift, width, hist);
    NK_TRY(cudaGetLastError());
    const bool last = pass == passes_for(kb) - 1;
    scan_kernel<K><<<1, kThreads, 0, stream>>>(ctl, shift, width, hist,
                                                last ? &ctl->answer : nullptr,
                                                last ? &ctl->done : nullptr);
    NK_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t median_run(const MedianArgs& args, cudaStream_t stream) {
  using W = acc_t<T>;
  using K = KeyT<W>;
  const Plan p = make_plan(args);
  char* ws = static_cast<char*>(args.workspace);
  Control<K>* ctl = reinterpret_cast<Control<K>*>(ws + p.off_ctl);
  unsigned long long* hist = reinterpret_cast<unsigned long long*>(ws + p.off_hist);
  W* a = reinterpret_cast<W*>(ws + p.off_a);
  W* b = p.pairwise ? a : reinterpret_cast<W*>(ws + p.off_b);
  W* norms = reinterpret_cast<W*>(ws + p.off_norms);
  double* partials = reinterpret_cast<double*>(ws + p.off_partials);
  W* centre = reinterpret_cast<W*>(ws + p.off_centre);
  K* sample = reinterpret_cast<K*>(ws + p.off_sample);
  K* kept = reinterpret_cast<K*>(ws + p.off_kept);
  const int64_t m_rows = p.pairwise ? 0 : p.m;  // rows of y in the prep kernels
  const int64_t rows = p.n + m_rows;

  TileArgs<W> t{};
  t.a = a;
  t.b = b;
  t.na = norms;
  t.nb = p.pairwise ? norms : norms + p.n;
  t.n = p.n;
  t.m = p.m;
  t.d = p.d;
  t.nbj = (p.m + kTile - 1) / kTile;
  t.ntiles = ((p.n + kTile - 1) / kTile) * t.nbj;
  t.pairwise = p.pairwise ? 1 : 0;
  const bool direct = p.d <= kDirectMaxD;

  for (int64_t bi = 0; bi < args.B; ++bi) {
    const T* x = static_cast<const T*>(args.x) + bi * p.n * p.d;
    const T* y = p.pairwise ? nullptr : static_cast<const T*>(args.y) + bi * p.m * p.d;
    T* out = static_cast<T*>(args.out) + bi;

    init_kernel<K><<<1, kThreads, 0, stream>>>(ctl, hist);
    NK_TRY(cudaGetLastError());
    stats_kernel<T, K><<<grid_for(rows * p.d), kThreads, 0, stream>>>(x, p.n * p.d, y,
                                                                      m_rows * p.d, ctl);
    NK_TRY(cudaGetLastError());
    if (p.d > 0) {
      const dim3 grid(static_cast<unsigned int>((p.d + 31) / 32),
                      static_cast<unsigned int>(p.col_chunks));
      colsum_kernel<T, K><<<grid, kThreads, 0, stream>>>(x, p.n, y, m_rows, p.d,
                                                         p.rows_per_chunk, ctl, partials);
      NK_TRY(cudaGetLastError());
      mean_kernel<W, K><<<grid_for(p.d), kThreads, 0, stream>>>(partials, p.col_chunks, p.d,
                                                                 rows, ctl, centre);
      NK_TRY(cudaGetLastError());
    }
    centre_kernel<T, K><<<grid_for(rows * 32), kThreads, 0, stream>>>(
        x, p.n, y, m_rows, p.d, ctl, centre, a, p.pairwise ? nullptr : b, norms);
    NK_TRY(cudaGetLastError());

    if (p.mode == kWindowMode) {
      sample_kernel<W><<<grid_for(p.samples * 32), kThreads, 0, stream>>>(
          a, b, p.n, p.m, p.d, t.pairwise, p.samples, ctl, sample);
      NK_TRY(cudaGetLastError());
      if (p.lo_pos >= 0) {
        arm_kernel<K><<<1, 1, 0, stream>>>(ctl, p.lo_pos, 0);
        NK_TRY(cudaGetLastError());
        NK_TRY(select_in_buffer<K>(sample, p.samples, nullptr, ctl, hist, &ctl->lo, nullptr,
                                   stream));
      }
      if (p.hi_pos >= 0) {
        arm_kernel<K><<<1, 1, 0, stream>>>(ctl, p.hi_pos, 0);
        NK_TRY(cudaGetLastError());
        NK_TRY(select_in_buffer<K>(sample, p.samples, nullptr, ctl, hist, &ctl->hi, nullptr,
                                   stream));
      }
    }
    if (direct) {
      NK_TRY((tile_passes<W, true>(p, t, ctl, hist, kept, stream)));
    } else {
      NK_TRY((tile_passes<W, false>(p, t, ctl, hist, kept, stream)));
    }
    finalize_kernel<T><<<1, 1, 0, stream>>>(ctl, args.squared ? 1 : 0, out);
    NK_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

}  // namespace

int64_t median_workspace_bytes(const MedianArgs& args) { return make_plan(args).bytes; }

cudaError_t median_pairwise_distance(const MedianArgs& args, cudaStream_t stream) {
  if (args.B <= 0) return cudaSuccess;
  if (args.N < 1 || args.d < 0 || (args.y == nullptr && args.N < 2) ||
      (args.y != nullptr && args.M < 1) || args.memory_budget <= 0) {
    return cudaErrorInvalidValue;
  }
  NK_DISPATCH_DTYPE(args.dtype, return median_run<scalar_t>(args, stream));
  return cudaErrorInvalidValue;
}

}  // namespace nk_cuda
