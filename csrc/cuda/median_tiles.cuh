// The median's distance tiles (design §3): a 64 x 64 block tile of pairs computed from
// shared-memory stages, and the two passes over every tile: the window pass (count below lo,
// keep the keys in [lo, hi]) and the radix pass (histogram of one digit of the keys matching the
// selection's prefix).
//
// Included by median_cuda.cu only (see median_common.cuh).
#pragma once

#include "median_select.cuh"

namespace nk_cuda {
namespace {

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

// Calls f(sq, valid) for each block tile of this block (tiles blockIdx.x, + gridDim.x, ...;
// those entirely below the diagonal skipped): sq are this thread's pairs' squared distances
// (tile_distances), valid which of them exist (valid_pairs). The loop is uniform per block.
// Contains __syncthreads: call from every thread.
template <typename W, bool DIRECT, typename F>
__device__ __forceinline__ void for_each_tile(const TileArgs<W>& t, TileSmem<W>& sm, F&& f) {
  for (int64_t tile = blockIdx.x; tile < t.ntiles; tile += gridDim.x) {
    int64_t i0, j0;
    if (!tile_origin(t, tile, &i0, &j0)) continue;
    W sq[kMicro][kMicro];
    tile_distances<W, DIRECT>(t, i0, j0, sm, sq);
    f(sq, valid_pairs(t, i0, j0));
  }
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
  for_each_tile<W, DIRECT>(t, sm, [&](const W (&sq)[kMicro][kMicro], unsigned int valid) {
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
  });
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
  for_each_tile<W, DIRECT>(t, sm, [&](const W (&sq)[kMicro][kMicro], unsigned int valid) {
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
  });
  flush_hist(sh, hist, bins);
}

}  // namespace
}  // namespace nk_cuda
