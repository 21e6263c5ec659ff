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
//
// Files: median_common.cuh (constants, keys, Control, scaling), median_prep.cuh (init, stats,
// centring, sample, finalize), median_select.cuh (radix selection machinery), median_tiles.cuh
// (distance tiles, window and radix passes); this file: the host plan and the launch sequence.
#include <algorithm>

#include "median_prep.cuh"
#include "median_select.cuh"
#include "median_tiles.cuh"

namespace nk_cuda {
namespace {

// ---- host plan -------------------------------------------------------------------------------

struct Plan {
  bool pairwise = true;
  int64_t n = 0, m = 0, d = 0, n_pairs = 0, k = 0;
  int work_bytes = 4, key_bytes = 4;
  Mode mode = kRadixMode;
  int64_t capacity = 0;           // kept keys the buffer holds
  int64_t samples = 0;            // window mode: sampled pairs
  int64_t lo_rank = -1, hi_rank = -1;  // their ranks that give lo and hi (-1: 0 / the max key)
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
  p.n_pairs = nk::pair_count(p.pairwise, p.n, p.m);
  p.k = nk::median_rank(p.n_pairs);

  // Selection path (shapes and budget only). The kept-key buffer may use half of the budget
  // (CPU: a quarter; here it is one preallocated buffer, with no growth or gather on top).
  const int64_t budget_keys = std::max<int64_t>(args.memory_budget, 0) / 2 / p.key_bytes;
  if (p.n_pairs <= std::min(budget_keys, kKeepAll)) {
    p.mode = kKeepAllMode;
    p.capacity = p.n_pairs;
  } else if (p.n_pairs >= 2) {
    // As the CPU kernel (nk::median_window); tried only when it should fit.
    const nk::MedianWindow w = nk::median_window(p.n_pairs, p.k, budget_keys);
    if (w.fits) {
      p.mode = kWindowMode;
      p.samples = w.samples;
      p.capacity = std::min(budget_keys, p.n_pairs);
      p.lo_rank = w.lo_rank;
      p.hi_rank = w.hi_rank;
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

// The passes of one radix selection over keys of type K: per pass, launch_hist(shift, width)
// enqueues the histogram of the digit [shift, shift + width) and scan_kernel fixes that digit on
// the device; the last pass writes the key to *dest and sets *done (if non-null).
template <typename K, typename LaunchHist>
cudaError_t radix_passes(Control<K>* ctl, unsigned long long* hist, K* dest, int* done,
                         cudaStream_t stream, LaunchHist&& launch_hist) {
  constexpr int kb = 8 * static_cast<int>(sizeof(K));
  const int np = passes_for(kb);
  for (int pass = 0; pass < np; ++pass) {
    int shift, width;
    digit_of_pass(kb, pass, &shift, &width);
    launch_hist(shift, width);
    NK_TRY(cudaGetLastError());
    const bool last = pass == np - 1;
    scan_kernel<K><<<1, kThreads, 0, stream>>>(ctl, shift, width, hist, last ? dest : nullptr,
                                                last ? done : nullptr);
    NK_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

// A radix selection over a key buffer of `capacity` keys (count: valid keys on the device, or
// null for all of them).
template <typename K>
cudaError_t select_in_buffer(const K* keys, int64_t capacity, const unsigned long long* count,
                             Control<K>* ctl, unsigned long long* hist, K* dest, int* done,
                             cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>(std::max<int64_t>((capacity + kThreads - 1) / kThreads, 1),
                                           kHistGridMax);
  return radix_passes<K>(ctl, hist, dest, done, stream, [&](int shift, int width) {
    hist_keys_kernel<K><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        keys, capacity, count, ctl, shift, width, hist);
  });
}

template <typename W, bool DIRECT>
cudaError_t tile_passes(const Plan& p, const TileArgs<W>& t, Control<KeyT<W>>* ctl,
                        unsigned long long* hist, KeyT<W>* kept, cudaStream_t stream) {
  using K = KeyT<W>;
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
  return radix_passes<K>(ctl, hist, &ctl->answer, &ctl->done, stream, [&](int shift, int width) {
    radix_pass_kernel<W, DIRECT><<<grid, kThreads, 0, stream>>>(t, ctl, shift, width, hist);
  });
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
  const bool direct = p.d <= nk::kDirectMaxD;

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
      // The window bounds: the sample keys of ranks lo_rank and hi_rank (-1: left open).
      const int64_t ranks[2] = {p.lo_rank, p.hi_rank};
      K* const bounds[2] = {&ctl->lo, &ctl->hi};
      for (int side = 0; side < 2; ++side) {
        if (ranks[side] < 0) continue;
        arm_kernel<K><<<1, 1, 0, stream>>>(ctl, ranks[side], 0);
        NK_TRY(cudaGetLastError());
        NK_TRY(select_in_buffer<K>(sample, p.samples, nullptr, ctl, hist, bounds[side], nullptr,
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
