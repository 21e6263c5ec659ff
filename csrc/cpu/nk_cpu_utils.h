// Shared machinery of the C++ CPU kernels: strided iteration over tensors that share one shape
// and fixed-size chunking of a list of tensors (kChunk, nk/chunk.h). The memory-overlap tests of
// the in-place kernels are nk/overlap.h, shared with the CUDA binding.
//
// Determinism: every chunk boundary and every iteration order below depends only on the tensors'
// shapes and strides, never on the number of threads or on their timing. Reductions store one
// partial per chunk and add the partials in chunk order afterwards, so their results are
// bit-identical whatever torch.set_num_threads says.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "nk/chunk.h"

namespace nk_cpu {

using nk::kChunk;

// One shape shared by `nops` operands, each with its own strides (in elements), after dropping
// size-1 dims and merging dims that are contiguous with their inner neighbour in every operand.
// Dims are row-major: sizes[ndim-1] is the innermost one.
struct Layout {
  int ndim = 0;
  int nops = 0;
  int64_t numel = 0;
  c10::SmallVector<int64_t, 6> sizes;
  c10::SmallVector<int64_t, 24> strides;  // strides[op * ndim + d]
  bool unit_inner = false;                // every operand has inner stride 1

  int64_t stride(int op, int d) const { return strides[op * ndim + d]; }
};

inline Layout make_layout(const std::vector<const at::Tensor*>& ops) {
  Layout L;
  L.nops = static_cast<int>(ops.size());
  const at::Tensor& t0 = *ops[0];
  L.numel = t0.numel();
  c10::SmallVector<int64_t, 6> sizes;
  c10::SmallVector<c10::SmallVector<int64_t, 6>, 4> strides(L.nops);
  for (int64_t d = 0; d < t0.dim(); ++d) {
    if (t0.size(d) == 1) continue;
    sizes.push_back(t0.size(d));
    for (int op = 0; op < L.nops; ++op) strides[op].push_back(ops[op]->stride(d));
  }
  if (sizes.empty()) {  // 0-d or all size-1 dims: one element
    sizes.push_back(1);
    for (int op = 0; op < L.nops; ++op) strides[op].push_back(1);
  }
  // Merge from the inside out: dim d folds into d+1 when stride[d] == stride[d+1] * size[d+1].
  c10::SmallVector<int64_t, 6> msizes;
  c10::SmallVector<c10::SmallVector<int64_t, 6>, 4> mstrides(L.nops);
  int n = static_cast<int>(sizes.size());
  // Build reversed (inner first), then flip.
  msizes.push_back(sizes[n - 1]);
  for (int op = 0; op < L.nops; ++op) mstrides[op].push_back(strides[op][n - 1]);
  for (int d = n - 2; d >= 0; --d) {
    bool merge = true;
    for (int op = 0; op < L.nops && merge; ++op) {
      merge = strides[op][d] == mstrides[op].back() * msizes.back();
    }
    if (merge) {
      msizes.back() *= sizes[d];
    } else {
      msizes.push_back(sizes[d]);
      for (int op = 0; op < L.nops; ++op) mstrides[op].push_back(strides[op][d]);
    }
  }
  L.ndim = static_cast<int>(msizes.size());
  L.sizes.assign(msizes.rbegin(), msizes.rend());
  L.strides.resize(static_cast<size_t>(L.nops) * L.ndim);
  L.unit_inner = true;
  for (int op = 0; op < L.nops; ++op) {
    for (int d = 0; d < L.ndim; ++d) {
      L.strides[op * L.ndim + d] = mstrides[op][L.ndim - 1 - d];
    }
    if (L.sizes[L.ndim - 1] > 1 && L.stride(op, L.ndim - 1) != 1) L.unit_inner = false;
  }
  return L;
}

// Visit the logical (row-major) elements [begin, end) of a Layout in order, as inner runs:
// f(ptrs, inner_strides, n) with ptrs[op] pointing at the run's first element of operand op,
// inner_strides[op] its stride between consecutive elements of the run, and n <= max_run.
template <typename T, typename F>
inline void for_range(const Layout& L, T* const* base, int64_t begin, int64_t end,
                      int64_t max_run, F&& f) {
  if (begin >= end) return;
  const int nd = L.ndim;
  const int nops = L.nops;
  c10::SmallVector<int64_t, 6> idx(nd);
  c10::SmallVector<int64_t, 8> off(nops, 0);
  c10::SmallVector<int64_t, 8> inner(nops);
  c10::SmallVector<T*, 8> ptrs(nops);
  int64_t rem = begin;
  for (int d = nd - 1; d >= 0; --d) {
    idx[d] = rem % L.sizes[d];
    rem /= L.sizes[d];
  }
  for (int op = 0; op < nops; ++op) {
    inner[op] = L.unit_inner ? 1 : L.stride(op, nd - 1);
    for (int d = 0; d < nd; ++d) off[op] += idx[d] * L.stride(op, d);
  }
  const int64_t inner_size = L.sizes[nd - 1];
  int64_t pos = begin;
  while (pos < end) {
    const int64_t n = std::min({end - pos, inner_size - idx[nd - 1], max_run});
    for (int op = 0; op < nops; ++op) ptrs[op] = base[op] + off[op];
    f(ptrs.data(), inner.data(), n);
    pos += n;
    idx[nd - 1] += n;
    for (int op = 0; op < nops; ++op) off[op] += n * L.stride(op, nd - 1);
    for (int d = nd - 1; d > 0 && idx[d] == L.sizes[d]; --d) {
      idx[d] = 0;
      ++idx[d - 1];
      for (int op = 0; op < nops; ++op) {
        off[op] += L.stride(op, d - 1) - L.sizes[d] * L.stride(op, d);
      }
    }
  }
}

// A list of positions p = 0..P-1, each with `nops` operands of one shape (e.g. a[p], b[p]),
// seen as one flat sequence of elements cut into fixed chunks of kChunk elements. A chunk may
// span several (small) tensors; each position's elements are visited in logical order.
struct ListPlan {
  int nops = 0;
  std::vector<Layout> layouts;          // per position
  std::vector<int64_t> prefix;          // prefix[p] = elements before position p; size P+1
  std::vector<void*> data;              // data[p * nops + op]: one allocation for the list
  int64_t total = 0;
  int64_t nchunks = 0;
};

// lists[op][p]; all lists have the same length and position-wise the same shapes.
inline ListPlan make_plan(const std::vector<at::TensorList>& lists) {
  ListPlan plan;
  plan.nops = static_cast<int>(lists.size());
  const size_t P = lists[0].size();
  plan.layouts.reserve(P);
  plan.data.resize(P * static_cast<size_t>(plan.nops));
  plan.prefix.assign(P + 1, 0);
  std::vector<const at::Tensor*> ops(plan.nops);
  for (size_t p = 0; p < P; ++p) {
    for (int op = 0; op < plan.nops; ++op) {
      ops[op] = &lists[op][p];
      plan.data[p * plan.nops + op] = lists[op][p].numel() ? lists[op][p].data_ptr() : nullptr;
    }
    plan.layouts.push_back(make_layout(ops));
    plan.prefix[p + 1] = plan.prefix[p] + lists[0][p].numel();
  }
  plan.total = plan.prefix[P];
  plan.nchunks = (plan.total + kChunk - 1) / kChunk;
  return plan;
}

// Visit the elements of chunk c: f(p, ptrs, inner_strides, n) per inner run, positions in order.
template <typename T, typename F>
inline void for_chunk(const ListPlan& plan, int64_t c, int64_t max_run, F&& f) {
  const int64_t cb = c * kChunk;
  const int64_t ce = std::min(plan.total, cb + kChunk);
  // First position whose range ends after cb.
  size_t p = std::upper_bound(plan.prefix.begin(), plan.prefix.end(), cb) - plan.prefix.begin();
  p = p == 0 ? 0 : p - 1;
  c10::SmallVector<T*, 4> base(plan.nops);
  for (; p + 1 < plan.prefix.size() && plan.prefix[p] < ce; ++p) {
    const int64_t lo = std::max(cb, plan.prefix[p]) - plan.prefix[p];
    const int64_t hi = std::min(ce, plan.prefix[p + 1]) - plan.prefix[p];
    if (lo >= hi) continue;
    for (int op = 0; op < plan.nops; ++op) base[op] = static_cast<T*>(plan.data[p * plan.nops + op]);
    const int pp = static_cast<int>(p);
    for_range<T>(plan.layouts[p], base.data(), lo, hi, max_run,
                 [&](T* const* ptrs, const int64_t* st, int64_t n) { f(pp, ptrs, st, n); });
  }
}

// Run body(c) for every chunk, in parallel with at least kChunksPerTask chunks per thread (so a
// list of 2 chunks, e.g. four 16K-element tensors, runs on the calling thread: waking a second
// thread for 32K elements costs more than it saves, and torch._foreach_* runs such lists
// serially); the order of chunks across threads does not matter to the callers (elementwise
// writes, or per-chunk partials), so results do not depend on it.
constexpr int64_t kChunksPerTask = 2;

template <typename F>
inline void parallel_chunks(int64_t nchunks, F&& body) {
  at::parallel_for(0, nchunks, kChunksPerTask, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) body(c);
  });
}

// The value of a 0-d floating CPU tensor as a double (what .item<double>() gives), read in place:
// no dispatcher round trip, which is most of the cost of a tiny call.
inline double read_scalar(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 0, "nats_kernels: expected a 0-d CPU tensor");
  double value = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "read_scalar", [&] {
    value = static_cast<double>(*t.const_data_ptr<scalar_t>());
  });
  return value;
}

// float32 math for float16/bfloat16/float32, float64 for float64 (design §9.1).
template <typename T>
using acc_t = at::opmath_type<T>;

}  // namespace nk_cpu
