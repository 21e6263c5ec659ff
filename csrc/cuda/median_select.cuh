// The median's radix selection (design §3): digits of a pass, the shared-memory histogram
// flushed to the global int64 histogram, the kernels that arm a selection, histogram the keys of
// a buffer and scan a histogram on the device, and the check after the window pass. The tile
// passes that histogram recomputed distances are in median_tiles.cuh.
//
// Included by median_cuda.cu only (see median_common.cuh).
#pragma once

#include "median_common.cuh"

namespace nk_cuda {
namespace {

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

}  // namespace
}  // namespace nk_cuda
