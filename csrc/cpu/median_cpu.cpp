// C++ CPU kernel of design §3: the exact lower median of pairwise Euclidean distances, without the
// N x N matrix. Arguments arrive validated (nats_kernels/ops/median.py): x is (B, N, d), y is
// (B, M, d) or None, both floating and of one dtype, memory_budget > 0.
//
// Per problem (batch element), in float32 (float64 for float64 inputs):
//
// 1. Scale the coordinates by an exact power of two so that they are below 1 in magnitude and
//    centre them on their mean (as the reference does: no overflow or underflow of the norms,
//    less cancellation in |a|^2 + |b|^2 - 2<a, b>).
// 2. Squared distances come tile by tile (tiles of at most kTileMax x kTileMax pairs, on or
//    above the diagonal only for the pairwise form): for d > kDirectMaxD one at::mm per tile and
//    (|a|^2 + |b|^2) - 2<a, b>; for small d the squared differences summed directly. Each value
//    becomes its key: the IEEE bit pattern of the (non-negative) value, which orders like the
//    value. The tiling depends only on the shapes and the budget (never on the thread count),
//    so a recomputed tile is bit-identical to the first computation.
// 3. Selection of the key of rank k = (n - 1) // 2 (the lower median), exactly:
//    * Window pass (the usual case: one pass over the tiles). The keys of S independent pairs
//      drawn by a fixed-seed generator (S = n / 512, clamped to [8192, 2^20]) give two keys
//      lo <= hi that bracket rank k by 6 standard deviations of the sample quantile. The pass
//      counts the keys below lo and keeps those in [lo, hi] (a few percent of them). If rank k
//      falls in the window and the kept keys fit a quarter of the budget, std::nth_element over
//      the kept keys gives the answer. A problem of at most kKeepAll pairs keeps every key.
//    * Otherwise (a sample that missed, by chance of about 1e-9, or a budget too small for the
//      window) radix selection with 16-bit digits over the bit patterns: each pass recomputes
//      the tiles and histograms the next digit of the keys that match the prefix fixed so far
//      (per-thread int64 histograms, summed afterwards), until all 32 (64) bits are pinned: 2
//      (4) more passes.
//    Either way the answer is one of the computed distances, and all counts are int64.
//    median_path_counts() reports how many problems each path solved.
// 4. Scale back by the power of two (squared, or after the square root).
//
// Small problems (at most median_small_limit() pairs, default kSmallPairs, whose pairs fit one
// tile and whose keys fit the kept-key quarter of the budget) take a short path instead
// (small_median): the same scaling and centring, the same distance formula on the same one
// tile, every key in one buffer and std::nth_element, without the tile plan, the per-thread
// states or the window machinery: its result is bit-identical to the tiled path's (both compute
// the same keys, and the selection is exact). A batch of them runs its problems in parallel.
//
// Parallelism: by default the problems of a batch run one after another, each with one parallel
// region per pass over its whole tiles (see for_each_tile). A batch of small problems instead
// runs its problems in parallel, one problem per thread with its tiles in sequence on that thread
// (see by_problem): problems that keep every key (at most kKeepAll pairs, and the keys of as many
// problems as threads within the kept-key quarter of the budget), when that takes no more rounds
// of tile work than sharing each problem's tiles out. A problem's result is the same bits either
// way: its tiles, keys and selection path do not depend on the thread computing them.
// Memory: one tile per thread (1/64 of the budget each, at most kTileMax^2 values), the kept
// keys (at most a quarter of memory_budget; with vector growth and the final gather at most 3/4
// of it, for the problems in flight together), per-thread histograms in the fallback, the sample,
// plus the scaled and centred copies of the inputs (of every problem in flight). A problem with
// NaN or Inf in its input returns NaN without computing distances (a distance with a non-finite
// coordinate is undefined), as the reference's result is.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "nk/median_plan.h"

namespace nk_cpu {
namespace {

// The sample, the window, the direct/GEMM threshold and the scaling are nk/median_plan.h, shared
// with the CUDA kernels. The tuning below is the CPU's own.
constexpr int64_t kTileMax = 512;     // side of a distance tile (fixed: recomputation repeats it)
// Problems with at most kKeepAll pairs keep all their keys (when they fit the budget); larger
// ones sample pairs to place the window. Tuned per backend (CUDA: 2^22): where keeping every key
// stops paying depends on how keys are kept and selected (growing vectors and std::nth_element
// here, a preallocated buffer and radix passes on CUDA).
constexpr int64_t kKeepAll = int64_t{1} << 18;
// Radix digit width: 65536 int64 bins per thread (2 passes for float32 keys, 4 for float64);
// CUDA's 11 bits fit a block's shared memory instead.
constexpr int kDigitBits = 16;
constexpr int64_t kBins = int64_t{1} << kDigitBits;

// How many problems each selection path finished (for tests and profiling; see
// median_path_counts): [0] the window pass, [1] the radix fallback, [2] the small path.
std::atomic<int64_t> g_path_counts[3] = {{0}, {0}, {0}};

// The small path (small_median) takes problems of at most this many pairs (when they fit one
// tile and the kept-key capacity). Every problem that fits one tile gains from it: the tiled
// path runs a one-tile problem on one thread too, with more fixed costs (the kernel alone, one
// thread, busy 2-core machine: N = 64, d = 2 in 11-16 us against 49-82 us; N = 512, d = 2
// 1.3 ms against 2.2 ms; N = 256, d = 1025 2.8 ms against 3.1 ms), so the limit is the keep-all
// one. A test knob (median_small_limit) lowers it, to compare the two paths on one problem.
constexpr int64_t kSmallPairs = int64_t{1} << 18;
// A batch of small problems runs in parallel in chunks of at least this much work (pairs times
// min(d, 16)), so that a few tiny problems never pay for a parallel region.
constexpr int64_t kSmallChunk = int64_t{1} << 16;
std::atomic<int64_t> g_small_limit{kSmallPairs};

// Threads that may run a pass's rows at once, i.e. the per-thread states a pass needs: the pool,
// or 1 inside a parallel region (a problem solved on one thread of the by-problem loop, where
// for_each_tile's at::parallel_for runs inline as thread 0).
inline int pass_threads() { return at::in_parallel_region() ? 1 : at::get_num_threads(); }

// Side of the distance tiles for an (n, m) problem under memory_budget, elem_bytes per value:
// each thread holds one tile of 1/64 of the budget, so that up to 16 threads' tiles take a
// quarter of it. The side depends on the budget and shapes only, never on the thread count or on
// how problems are shared out, so tiles (and results) are the same whatever the parallelism.
inline int64_t tile_side(int64_t memory_budget, int64_t elem_bytes, int64_t n, int64_t m) {
  const int64_t tile_budget = std::max<int64_t>(1, memory_budget / 64 / elem_bytes);
  int64_t side = 1;
  while ((side + 1) * (side + 1) <= tile_budget && side < kTileMax) ++side;
  return std::min(side, std::max(n, m));
}

// Keys a problem may keep: a quarter of the budget (CUDA: half); with vector growth and the final
// gather they take up to three times that.
inline int64_t kept_capacity(int64_t memory_budget, int64_t key_bytes) {
  return memory_budget / 4 / key_bytes;
}

// The order-dependent parts of the preparation, written out so that the tiled path and the
// small path round them alike (every other preparation step is one exact or correctly rounded
// operation per value, the same bits however it is computed). Each value is summed in a fixed
// order, whatever the thread count.

// Elements of work per parallel chunk of the preparation loops (smaller inputs run inline).
constexpr int64_t kPrepGrain = int64_t{1} << 16;

// centre[f] = (sum_i a[i][f] + sum_j b[j][f]) / (n + m), rows summed in order in double, then
// rounded to T. a: (n, d) contiguous; b: (m, d) contiguous, or nullptr (m = 0): the mean of a.
// Parallel over the features; each feature's sum is sequential over the rows.
template <typename T>
void centre_of(const T* a, int64_t n, const T* b, int64_t m, int64_t d, T* centre) {
  const int64_t rows = n + m;
  at::parallel_for(0, d, std::max<int64_t>(1, kPrepGrain / std::max<int64_t>(rows, 1)),
                   [&](int64_t f0, int64_t f1) {
    const int64_t w = f1 - f0;
    constexpr int64_t kStack = 64;
    double stack[kStack];
    std::vector<double> heap(w > kStack ? w : 0);
    double* acc = w > kStack ? heap.data() : stack;
    for (int64_t f = 0; f < w; ++f) acc[f] = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const T* row = a + i * d + f0;
      for (int64_t f = 0; f < w; ++f) acc[f] += static_cast<double>(row[f]);
    }
    for (int64_t j = 0; j < m; ++j) {
      const T* row = b + j * d + f0;
      for (int64_t f = 0; f < w; ++f) acc[f] += static_cast<double>(row[f]);
    }
    for (int64_t f = 0; f < w; ++f)
      centre[f0 + f] = static_cast<T>(acc[f] / static_cast<double>(rows));
  });
}

// out[i] = |a_i|^2 for the n rows of a (n, d) contiguous: 8 partial sums in double (feature f
// into lane f % 8), added in a fixed order, then rounded to T. Parallel over the rows.
template <typename T>
void row_norms(const T* a, int64_t n, int64_t d, T* out) {
  at::parallel_for(0, n, std::max<int64_t>(1, kPrepGrain / std::max<int64_t>(d, 1)),
                   [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const T* u = a + i * d;
      constexpr int kLanes = 8;
      double part[kLanes] = {};
      int64_t f = 0;
      for (; f + kLanes <= d; f += kLanes)
        for (int l = 0; l < kLanes; ++l) {
          const double v = static_cast<double>(u[f + l]);
          part[l] += v * v;
        }
      for (int l = 0; f < d; ++f, ++l) {
        const double v = static_cast<double>(u[f]);
        part[l] += v * v;
      }
      double acc = 0.0;
      for (int l = 0; l < kLanes; ++l) acc += part[l];
      out[i] = static_cast<T>(acc);
    }
  });
}

// The squared distances of one row of pairs, shared by the tiled path (for_each_tile) and the
// small path (small_median), which must compute the same keys:
// direct form: sq[c] = sum_f (a_i[f] - b_c[f])^2 for c in [c0, c1), features in order, with b
// transposed (bt[f * ld + c]);
// GEMM form: sq[c] = (|a_i|^2 + |b_c|^2) - 2 * sq[c], sq holding the dot products.
template <typename T>
inline void direct_row(const T* ai, const T* bt, int64_t ld, int64_t d, int64_t c0, int64_t c1,
                       T* sq) {
  for (int64_t c = c0; c < c1; ++c) sq[c] = T(0);
  for (int64_t f = 0; f < d; ++f) {
    const T x = ai[f];
    const T* col = bt + f * ld;
    for (int64_t c = c0; c < c1; ++c) {
      const T diff = x - col[c];
      sq[c] += diff * diff;
    }
  }
}

template <typename T>
inline void gemm_row(T ni, const T* nj, int64_t c0, int64_t c1, T* sq) {
  for (int64_t c = c0; c < c1; ++c) sq[c] = (ni + nj[c]) - T(2) * sq[c];
}

template <typename T>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
};
template <>
struct KeyOf<double> {
  using type = uint64_t;
};

// The key of a squared distance: its bit pattern, after turning a negative value (rounding in
// the |a|^2 + |b|^2 - 2<a, b> form) and -0 into +0, so that bit patterns order like values.
// NaN cannot occur: problems with non-finite inputs never get here, and scaled coordinates
// below 1 keep every norm, dot product and difference finite. Branch-free, so loops vectorize.
template <typename T>
inline typename KeyOf<T>::type key_of(T v) {
  v = v > T(0) ? v : T(0);
  typename KeyOf<T>::type k;
  std::memcpy(&k, &v, sizeof(T));
  return k;
}

template <typename T>
struct Problem {
  at::Tensor a, b;            // (n, d), (m, d): scaled, centred, contiguous, work dtype
  at::Tensor norm_a, norm_b;  // (n,), (m,) (GEMM form)
  at::Tensor b_t;             // (d, m) contiguous (direct form)
  int64_t n = 0, m = 0, d = 0;
  bool pairwise = true;
  bool direct = false;  // d <= kDirectMaxD: sum the squared differences, no GEMM
  int64_t tile = 1;
};

// Calls row_fn(thread, sq, c0, cols) for every row of every tile: sq[c], c in [c0, cols), is the
// squared distance of the pair (i, j0 + c) before key_of, and only pairs j > i appear for the
// pairwise form. GEMM form: one at::mm per tile, then each row turns its dot products into
// (|a_i|^2 + |b_j|^2) - 2<a_i, b_j> in place. Direct form (small d): each row sums (a_i - b_j)^2
// over the d features into its slice of the tile buffer.
//
// One parallel region per pass, over whole tiles: each thread computes its tiles with a
// single-threaded mm (nested parallelism is off inside at::parallel_for) into its own buffer. A
// region per tile would pay an OpenMP fork/join per tile, measured to dominate on a busy 2-core
// machine. A tile's values depend only on its shape and data, never on the thread computing it.
template <typename T, typename RowFn>
void for_each_tile(const Problem<T>& P, const RowFn& row_fn) {
  const int64_t t = P.tile, d = P.d;
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t i0 = 0; i0 < P.n; i0 += t)
    for (int64_t j0 = P.pairwise ? i0 : 0; j0 < P.m; j0 += t) tiles.emplace_back(i0, j0);
  const T* na = P.direct ? nullptr : P.norm_a.template data_ptr<T>();
  const T* nb = P.direct ? nullptr : P.norm_b.template data_ptr<T>();
  const T* a = P.a.template data_ptr<T>();
  const T* bt = P.direct ? P.b_t.template data_ptr<T>() : nullptr;
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t first, int64_t last) {
    const int thread = at::get_thread_num();
    at::Tensor flat = at::empty({t * t}, P.a.options());
    for (int64_t idx = first; idx < last; ++idx) {
      const int64_t i0 = tiles[idx].first, j0 = tiles[idx].second;
      const int64_t ti = std::min(t, P.n - i0), tj = std::min(t, P.m - j0);
      at::Tensor out = flat.narrow(0, 0, ti * tj).view({ti, tj});
      if (!P.direct) at::mm_out(out, P.a.narrow(0, i0, ti), P.b.narrow(0, j0, tj).t());
      T* buf = out.template data_ptr<T>();
      const bool diagonal = P.pairwise && i0 == j0;
      for (int64_t r = 0; r < ti; ++r) {
        const int64_t c0 = diagonal ? r + 1 : 0;
        if (c0 >= tj) continue;
        T* sq = buf + r * tj;
        const int64_t i = i0 + r;
        if (P.direct) {
          direct_row<T>(a + i * d, bt + j0, P.m, d, c0, tj, sq);
        } else {
          gemm_row<T>(na[i], nb + j0, c0, tj, sq);
        }
        row_fn(thread, sq, c0, tj);
      }
    }
  });
}

struct alignas(64) WindowState {
  int64_t below = 0;
  int64_t inside = 0;
};

// The next output of the splitmix64 sequence whose state is `state` (nk/median_plan.h).
inline uint64_t splitmix64(uint64_t& state) {
  return nk::splitmix64_mix(state += nk::kSplitmixGamma);
}

// The keys of `count` pairs drawn uniformly (with replacement) from the problem's pairs by a
// fixed-seed generator, squared distances summed directly. Independent pairs, not a grid of
// sampled points: the median of the distances among a few hundred sampled points is off by
// percents of rank (each point's influence does not average out), that of independent pairs by
// ~0.5/sqrt(count).
template <typename T>
std::vector<typename KeyOf<T>::type> sample_keys(const Problem<T>& P, int64_t count) {
  using K = typename KeyOf<T>::type;
  std::vector<int64_t> pi(count), pj(count);
  uint64_t state = nk::kSampleSeed;  // fixed seed: the sample depends on shapes only
  const uint64_t n = static_cast<uint64_t>(P.n), m = static_cast<uint64_t>(P.m);
  for (int64_t s = 0; s < count; ++s) {
    uint64_t i, j;
    do {
      i = splitmix64(state) % n;
      j = splitmix64(state) % m;
    } while (P.pairwise && i == j);
    pi[s] = static_cast<int64_t>(i);
    pj[s] = static_cast<int64_t>(j);
  }
  const int64_t d = P.d;
  const T* a = P.a.template data_ptr<T>();
  const T* b = P.b.template data_ptr<T>();
  std::vector<K> keys(count);
  at::parallel_for(0, count, std::max<int64_t>(1, 65536 / std::max<int64_t>(d, 1)),
                   [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const T* u = a + pi[s] * d;
      const T* v = b + pj[s] * d;
      constexpr int kLanes = 8;  // independent partial sums (a sample needs no fixed order)
      T part[kLanes] = {};
      int64_t t = 0;
      for (; t + kLanes <= d; t += kLanes)
        for (int l = 0; l < kLanes; ++l) {
          const T diff = u[t + l] - v[t + l];
          part[l] += diff * diff;
        }
      T acc = 0;
      for (; t < d; ++t) acc += (u[t] - v[t]) * (u[t] - v[t]);
      for (int l = 0; l < kLanes; ++l) acc += part[l];
      keys[s] = key_of<T>(acc);
    }
  });
  return keys;
}

// Window pass: true and the key of rank k in `answer` when rank k lies in [lo, hi] and the keys
// there fit `capacity`; false otherwise.
template <typename T>
bool window_select(const Problem<T>& P, int64_t k, typename KeyOf<T>::type lo,
                   typename KeyOf<T>::type hi, int64_t capacity,
                   typename KeyOf<T>::type* answer) {
  using K = typename KeyOf<T>::type;
  const int nthreads = pass_threads();
  std::vector<WindowState> state(nthreads);
  std::vector<std::vector<K>> kept(nthreads);
  const K span = static_cast<K>(hi - lo);
  // Kept keys are counted globally; once they exceed the capacity every thread drops its own
  // and stops keeping. Whether that happens depends only on the total, not on thread timing:
  // every row adds its count until the flag is up, so the flag goes up iff the total exceeds it.
  std::atomic<int64_t> kept_total{0};
  std::atomic<bool> overflow{false};
  auto row = [&](int thread, const T* sq, int64_t c0, int64_t cols) {
    // Count first (a branch-free loop), then keep the row's window keys if it has any.
    int64_t below = 0, inside = 0;
    for (int64_t c = c0; c < cols; ++c) {
      const K key = key_of<T>(sq[c]);
      below += key < lo;
      inside += static_cast<K>(key - lo) <= span;  // lo <= key <= hi
    }
    WindowState& s = state[thread];
    s.below += below;
    s.inside += inside;
    if (inside == 0) return;
    std::vector<K>& v = kept[thread];
    if (overflow.load(std::memory_order_relaxed)) {
      if (v.capacity() > 0) std::vector<K>().swap(v);
      return;
    }
    if (kept_total.fetch_add(inside, std::memory_order_relaxed) + inside > capacity) {
      overflow.store(true, std::memory_order_relaxed);
      std::vector<K>().swap(v);
      return;
    }
    for (int64_t c = c0; c < cols; ++c) {
      const K key = key_of<T>(sq[c]);
      if (static_cast<K>(key - lo) <= span) v.push_back(key);
    }
  };
  for_each_tile(P, row);
  int64_t below = 0, inside = 0;
  for (const auto& s : state) {
    below += s.below;
    inside += s.inside;
  }
  if (overflow.load() || k < below || k >= below + inside) return false;
  std::vector<K> all;
  all.reserve(inside);
  for (auto& v : kept) {
    all.insert(all.end(), v.begin(), v.end());
    std::vector<K>().swap(v);
  }
  auto nth = all.begin() + (k - below);
  std::nth_element(all.begin(), nth, all.end());
  *answer = *nth;
  return true;
}

// Radix selection over recomputed tiles: kKeyBits / 16 passes, each pinning one 16-bit digit.
template <typename T>
typename KeyOf<T>::type radix_select(const Problem<T>& P, int64_t k) {
  using K = typename KeyOf<T>::type;
  constexpr int kKeyBits = 8 * sizeof(K);
  const int nthreads = pass_threads();
  std::vector<std::vector<int64_t>> hist(nthreads);
  K prefix = 0;
  int64_t rank = k;
  for (int shift = kKeyBits - kDigitBits; shift >= 0; shift -= kDigitBits) {
    // Bits above the current digit must equal the prefix found so far (none on the first pass).
    const K high_mask =
        shift + kDigitBits >= kKeyBits ? K(0) : static_cast<K>(~K(0) << (shift + kDigitBits));
    for (auto& h : hist) h.assign(kBins, 0);
    auto row = [&](int thread, const T* sq, int64_t c0, int64_t cols) {
      int64_t* h = hist[thread].data();
      for (int64_t c = c0; c < cols; ++c) {
        const K key = key_of<T>(sq[c]);
        if ((key & high_mask) == prefix) ++h[(key >> shift) & (kBins - 1)];
      }
    };
    for_each_tile(P, row);
    int64_t digit = 0;
    for (; digit < kBins; ++digit) {
      int64_t count = 0;
      for (const auto& h : hist) count += h[digit];
      if (rank < count) break;
      rank -= count;
    }
    // digit < kBins always: the prefix's keys number more than `rank` by construction.
    prefix |= static_cast<K>(static_cast<K>(digit) << shift);
  }
  return prefix;
}

// The median of one problem: x (N, d), y (M, d) or none; NaN if any coordinate is NaN or Inf.
template <typename T>
T median_one(const at::Tensor& x, const c10::optional<at::Tensor>& y, bool squared,
             int64_t memory_budget) {
  using K = typename KeyOf<T>::type;
  const auto work = c10::CppTypeToScalarType<T>::value;
  Problem<T> P;
  P.pairwise = !y.has_value();
  P.n = x.size(0);
  P.m = P.pairwise ? P.n : y->size(0);
  const int64_t d = x.size(1);

  // Exact power-of-two scaling: |coordinates| < 2^e, clamped so that 2^-e and 2^e are normal.
  at::Tensor a = x.to(work);
  at::Tensor b = P.pairwise ? a : y->to(work);
  // Largest |coordinate| from one min/max reduction (no |x| temporary); NaN propagates through
  // it and Inf is infinite, so it also tells whether the problem is finite.
  auto absmax = [](const at::Tensor& t) -> double {
    auto mm = at::aminmax(t);
    const double lo = std::get<0>(mm).template item<double>();
    const double hi = std::get<1>(mm).template item<double>();
    if (std::isnan(lo) || std::isnan(hi)) return std::numeric_limits<double>::quiet_NaN();
    return std::max(-lo, hi);
  };
  double big = 0.0;
  if (d > 0) {
    const double ba = absmax(a);
    const double bb = P.pairwise ? 0.0 : absmax(b);
    if (!std::isfinite(ba) || !std::isfinite(bb)) return std::numeric_limits<T>::quiet_NaN();
    big = std::max(ba, bb);
  }
  // big is a value of T (the largest |coordinate| of a T tensor), so the cast is exact.
  const int e = nk::scale_exponent<T>(static_cast<T>(big));
  const T down = nk::pow2(T(0), -e);
  const T up = nk::pow2(T(0), e);
  // Scaled (a new tensor even when x already has the work dtype), then centred on the mean
  // (centre_of: the order the small path uses too).
  a = (a * down).contiguous();
  if (!P.pairwise) b = (b * down).contiguous();
  at::Tensor centre = at::empty({1, d}, a.options());
  centre_of<T>(a.template data_ptr<T>(), P.n, P.pairwise ? nullptr : b.template data_ptr<T>(),
               P.pairwise ? 0 : P.m, d, centre.template data_ptr<T>());
  a -= centre;
  if (P.pairwise) {
    b = a;
  } else {
    b -= centre;
  }
  P.a = a;
  P.b = b;
  P.d = d;
  P.direct = d <= nk::kDirectMaxD;
  if (P.direct) {
    P.b_t = P.b.t().contiguous();
  } else {
    P.norm_a = at::empty({P.n}, a.options());
    row_norms<T>(P.a.template data_ptr<T>(), P.n, d, P.norm_a.template data_ptr<T>());
    if (P.pairwise) {
      P.norm_b = P.norm_a;
    } else {
      P.norm_b = at::empty({P.m}, a.options());
      row_norms<T>(P.b.template data_ptr<T>(), P.m, d, P.norm_b.template data_ptr<T>());
    }
  }

  const int64_t n_pairs = nk::pair_count(P.pairwise, P.n, P.m);
  const int64_t k = nk::median_rank(n_pairs);
  P.tile = tile_side(memory_budget, sizeof(T), P.n, P.m);
  // Kept keys may take a quarter of the budget (CUDA: half): with vector growth and the final
  // gather they take up to three times that.
  const int64_t capacity = kept_capacity(memory_budget, sizeof(K));

  K key = 0;
  bool found = false;
  if (n_pairs <= std::min(capacity, kKeepAll)) {  // small: keep every key
    found = window_select<T>(P, k, K(0), static_cast<K>(~K(0)), capacity, &key);
  } else {
    // The window: sample ranks around rank k's quantile (nk::median_window).
    const nk::MedianWindow w = nk::median_window(n_pairs, k, capacity);
    std::vector<K> s = sample_keys<T>(P, w.samples);
    K lo = 0, hi = static_cast<K>(~K(0));
    if (w.lo_rank >= 0) {
      auto it = s.begin() + w.lo_rank;
      std::nth_element(s.begin(), it, s.end());
      lo = *it;
    }
    if (w.hi_rank >= 0) {
      auto it = s.begin() + w.hi_rank;
      std::nth_element(s.begin(), it, s.end());
      hi = *it;
    }
    std::vector<K>().swap(s);
    // A window that cannot fit (expected keys beyond the capacity) is not tried.
    if (w.fits) found = window_select<T>(P, k, lo, hi, capacity, &key);
  }
  if (!found) key = radix_select<T>(P, k);
  ++g_path_counts[found ? 0 : 1];
  T value;
  std::memcpy(&value, &key, sizeof(T));
  // Undo the scaling: exact, unless the true value lies beyond the dtype's range.
  return squared ? value * up * up : std::sqrt(value) * up;
}

// Whether (n, m) problems take the small path: at most median_small_limit() pairs, all of them in
// one tile (so that the GEMM form's one at::mm has the tiled path's shapes) and every key within
// the kept-key capacity (what the tiled path keeps of them too).
bool small_path(bool pairwise, int64_t n, int64_t m, int64_t elem_bytes, int64_t memory_budget) {
  const int64_t n_pairs = nk::pair_count(pairwise, n, m);
  return n_pairs <= g_small_limit.load(std::memory_order_relaxed) &&
         n_pairs <= kept_capacity(memory_budget, elem_bytes) &&
         tile_side(memory_budget, elem_bytes, n, m) >= std::max(n, m);
}

// The median of one small problem (small_path): x (n, d) with strides (sxn, sxd), y likewise or
// nullptr, in the work type T. The tiled path's steps, written for one tile: the same scaling
// and centring (centre_of), the same squared distances (the direct form's sum of squared
// differences in feature order, or the GEMM form's one at::mm of the whole tile and row_norms),
// so the same keys; all of them in one buffer, and std::nth_element picks rank k. NaN when an
// input is NaN or Inf, as there.
template <typename T>
T small_median(const T* x, int64_t sxn, int64_t sxd, const T* y, int64_t syn, int64_t syd,
               int64_t n, int64_t m, int64_t d, bool squared) {
  using K = typename KeyOf<T>::type;
  const bool pairwise = y == nullptr;
  if (pairwise) m = n;
  // Largest |coordinate|, from the bit patterns with the sign bit cleared: they order like the
  // values, with Inf and NaN above every finite value, and their max is an integer reduction
  // (it vectorizes). Any NaN or Inf makes the problem NaN.
  constexpr K kMagnitude = static_cast<K>(~K(0) >> 1);
  K top = 0;
  auto scan = [&](const T* p, int64_t rows, int64_t sr, int64_t sf) {
    auto one = [&](const T* v) {
      K u;
      std::memcpy(&u, v, sizeof(T));
      u &= kMagnitude;
      top = u > top ? u : top;
    };
    if (sf == 1 && sr == d) {
      for (int64_t i = 0; i < rows * d; ++i) one(p + i);
    } else {
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t f = 0; f < d; ++f) one(p + i * sr + f * sf);
    }
  };
  scan(x, n, sxn, sxd);
  if (!pairwise) scan(y, m, syn, syd);
  const T inf = std::numeric_limits<T>::infinity();
  K inf_bits;
  std::memcpy(&inf_bits, &inf, sizeof(T));
  if (top >= inf_bits) return std::numeric_limits<T>::quiet_NaN();
  T big;
  std::memcpy(&big, &top, sizeof(T));
  const int e = nk::scale_exponent<T>(big);
  const T down = nk::pow2(T(0), -e);
  const T up = nk::pow2(T(0), e);

  const bool direct = d <= nk::kDirectMaxD;
  // The scaled, centred coordinates: a (n, d), b (m, d) (the cross form's; the pairwise form's
  // b is a). The GEMM form keeps them in tensors for at::mm (aligned as the tiled path's).
  at::Tensor a_t, b_t;
  std::unique_ptr<T[]> work;
  T *a, *b;
  if (direct) {
    work.reset(new T[(n + (pairwise ? 0 : m)) * d]);
    a = work.get();
    b = pairwise ? a : a + n * d;
  } else {
    const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    a_t = at::empty({n, d}, opts);
    a = a_t.template data_ptr<T>();
    if (pairwise) {
      b_t = a_t;
      b = a;
    } else {
      b_t = at::empty({m, d}, opts);
      b = b_t.template data_ptr<T>();
    }
  }
  auto scale = [&](T* dst, const T* p, int64_t rows, int64_t sr, int64_t sf) {
    if (sf == 1 && sr == d) {
      for (int64_t i = 0; i < rows * d; ++i) dst[i] = p[i] * down;
    } else {
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t f = 0; f < d; ++f) dst[i * d + f] = p[i * sr + f * sf] * down;
    }
  };
  scale(a, x, n, sxn, sxd);
  if (!pairwise) scale(b, y, m, syn, syd);
  std::vector<T> centre(d);
  centre_of<T>(a, n, pairwise ? nullptr : b, pairwise ? 0 : m, d, centre.data());
  auto centre_rows = [&](T* p, int64_t count) {
    for (int64_t i = 0; i < count; ++i)
      for (int64_t f = 0; f < d; ++f) p[i * d + f] -= centre[f];
  };
  centre_rows(a, n);
  if (!pairwise) centre_rows(b, m);

  const int64_t n_pairs = nk::pair_count(pairwise, n, m);
  std::unique_ptr<K[]> keys(new K[n_pairs > 0 ? n_pairs : 1]);
  int64_t at_key = 0;
  if (direct) {
    // b transposed (d, m), so that each row of pairs runs along contiguous columns, and one row
    // of squared distances: the tiled path's loop.
    std::unique_ptr<T[]> bt_row(new T[d * m + m]);
    T* bt = bt_row.get();
    T* sq = bt + d * m;
    for (int64_t j = 0; j < m; ++j)
      for (int64_t f = 0; f < d; ++f) bt[f * m + j] = b[j * d + f];
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c0 = pairwise ? i + 1 : 0;
      if (c0 >= m) continue;
      direct_row<T>(a + i * d, bt, m, d, c0, m, sq);
      K* out = keys.get() + at_key;
      for (int64_t c = c0; c < m; ++c) out[c - c0] = key_of<T>(sq[c]);
      at_key += m - c0;
    }
  } else {
    std::vector<T> norms(pairwise ? n : n + m);
    row_norms<T>(a, n, d, norms.data());
    const T* na = norms.data();
    const T* nb = na;
    if (!pairwise) {
      row_norms<T>(b, m, d, norms.data() + n);
      nb = na + n;
    }
    // The tiled path's one tile: at::mm of the same shapes, called from the same (inline)
    // parallel region as for_each_tile calls it.
    at::Tensor dots = at::empty({n, m}, a_t.options());
    at::parallel_for(0, 1, 1, [&](int64_t, int64_t) { at::mm_out(dots, a_t, b_t.t()); });
    T* dot = dots.template data_ptr<T>();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c0 = pairwise ? i + 1 : 0;
      T* row = dot + i * m;
      gemm_row<T>(na[i], nb, c0, m, row);
      K* out = keys.get() + at_key;
      for (int64_t c = c0; c < m; ++c) out[c - c0] = key_of<T>(row[c]);
      if (c0 < m) at_key += m - c0;
    }
  }
  const int64_t k = nk::median_rank(n_pairs);
  std::nth_element(keys.get(), keys.get() + k, keys.get() + n_pairs);
  ++g_path_counts[2];
  T value;
  std::memcpy(&value, keys.get() + k, sizeof(T));
  return squared ? value * up * up : std::sqrt(value) * up;
}

// Whether a batch of `batch` (n, m) problems runs one problem per thread (each problem's passes
// then run inline on its thread) rather than problem after problem with each pass's tiles shared
// out. Only problems that keep every key qualify: at most kKeepAll pairs (a handful of tiles of
// at most 512 x 512, whose serial parts, the preparation and the nth_element over all kept keys,
// weigh as much as the tiles), and `threads` of them keeping their keys at once within the
// capacity that one problem may use, so that the memory rule above holds for the problems in
// flight together (their kept keys, the threads' tiles). Among those, problems run in parallel
// when that takes no more rounds of tile work, ceil(batch / threads) * tiles, than sharing each
// problem's tiles out, batch * ceil(tiles / threads): always when a problem has fewer tiles than
// there are threads and the batch fills them. Which way runs changes no result (design §3.4).
bool by_problem(int64_t batch, bool pairwise, int64_t n, int64_t m, int64_t elem_bytes,
                int64_t memory_budget) {
  const int64_t threads = at::get_num_threads();
  if (batch < 2 || threads < 2 || at::in_parallel_region()) return false;
  const int64_t n_pairs = nk::pair_count(pairwise, n, m);
  if (n_pairs > kKeepAll || n_pairs > kept_capacity(memory_budget, elem_bytes) / threads)
    return false;
  const int64_t side = tile_side(memory_budget, elem_bytes, n, m);
  const int64_t rows = (n + side - 1) / side, cols = (m + side - 1) / side;
  const int64_t tiles = pairwise ? rows * (rows + 1) / 2 : rows * cols;
  const auto divup = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  return divup(batch, threads) * tiles <= batch * divup(tiles, threads);
}

at::Tensor median_pairwise_distance_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& y,
                                        bool squared, int64_t memory_budget) {
  const int64_t batch = x.size(0);
  const auto work = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor result = at::empty({batch}, x.options().dtype(work));
  AT_DISPATCH_FLOATING_TYPES(work, "median_pairwise_distance_cpu", [&] {
    scalar_t* r = result.data_ptr<scalar_t>();
    const int64_t n = x.size(1), m = y.has_value() ? y->size(1) : n, d = x.size(2);
    if (small_path(!y.has_value(), n, m, sizeof(scalar_t), memory_budget)) {
      // The inputs in the work type once for the whole batch (no copy when they have it).
      const at::Tensor xw = x.to(work);
      const at::Tensor yw = y.has_value() ? y->to(work) : at::Tensor();
      const scalar_t* xp = xw.data_ptr<scalar_t>();
      const scalar_t* yp = y.has_value() ? yw.data_ptr<scalar_t>() : nullptr;
      auto solve_small = [&](int64_t bi) {
        r[bi] = small_median<scalar_t>(
            xp + bi * xw.stride(0), xw.stride(1), xw.stride(2),
            yp == nullptr ? nullptr : yp + bi * yw.stride(0), yp ? yw.stride(1) : 0,
            yp ? yw.stride(2) : 0, n, m, d, squared);
      };
      // Problems in parallel (each on one thread, the same bits whichever) once a chunk holds
      // kSmallChunk pairs of work; fewer run inline, without a parallel region.
      const int64_t per = std::max<int64_t>(1, nk::pair_count(!y.has_value(), n, m) *
                                                   std::max<int64_t>(1, std::min<int64_t>(d, 16)));
      const int64_t grain = std::max<int64_t>(1, kSmallChunk / per);
      if (batch > grain && at::get_num_threads() > 1 && !at::in_parallel_region()) {
        const at::ThreadLocalState tls;
        at::parallel_for(0, batch, grain, [&](int64_t first, int64_t last) {
          at::ThreadLocalStateGuard guard(tls);
          for (int64_t bi = first; bi < last; ++bi) solve_small(bi);
        });
      } else {
        for (int64_t bi = 0; bi < batch; ++bi) solve_small(bi);
      }
      return;
    }
    auto solve = [&](int64_t bi) {
      const at::Tensor xb = x.select(0, bi);
      c10::optional<at::Tensor> yb;
      if (y.has_value()) yb = y->select(0, bi);
      r[bi] = median_one<scalar_t>(xb, yb, squared, memory_budget);
    };
    if (by_problem(batch, !y.has_value(), n, m, sizeof(scalar_t), memory_budget)) {
      // One parallel region for the whole batch. The workers get the caller's thread-local
      // state (grad mode, dispatch keys), as the caller's own thread has it.
      const at::ThreadLocalState tls;
      at::parallel_for(0, batch, 1, [&](int64_t first, int64_t last) {
        at::ThreadLocalStateGuard guard(tls);
        for (int64_t bi = first; bi < last; ++bi) solve(bi);
      });
    } else {
      for (int64_t bi = 0; bi < batch; ++bi) solve(bi);
    }
  });
  return result.to(x.scalar_type());
}

}  // namespace

// (window, radix, small) problems solved since the library was loaded.
at::Tensor median_path_counts() {
  return at::tensor({g_path_counts[0].load(), g_path_counts[1].load(), g_path_counts[2].load()},
                    at::kLong);
}

// The small path's largest pair count before the call; set to `pairs` when pairs >= 0 (0: never
// the small path). A test knob: it makes the tiled path solve a small problem.
int64_t median_small_limit(int64_t pairs) {
  return pairs >= 0 ? g_small_limit.exchange(pairs) : g_small_limit.load();
}

}  // namespace nk_cpu

TORCH_LIBRARY_IMPL(nats_kernels_ext, CPU, m) {
  m.impl("median_pairwise_distance", &nk_cpu::median_pairwise_distance_cpu);
}

TORCH_LIBRARY_IMPL(nats_kernels_ext, CompositeExplicitAutograd, m) {
  m.impl("median_path_counts", &nk_cpu::median_path_counts);
  m.impl("median_small_limit", &nk_cpu::median_small_limit);
}
