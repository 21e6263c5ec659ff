// Launchers of the CUDA kernels (design §1, §3, §4, §5) on raw device pointers and a cudaStream_t.
//
// Plain C++ with no torch include: the .cu files compile with nvcc alone (.ci/nvcc_check), and
// only the binding (*_binding.cpp, binding_layout.h) knows about at::Tensor. It hands the
// launchers what they assume:
//   * every data pointer addresses `numel` elements laid out densely in memory (the binding makes
//     strided tensors so, see binding_layout.h); all operands of one position share that
//     layout, so element k of one is element k of the others;
//   * small per-step scalars (weights, scale, w_r, w_f, r) already in the math type (Acc below);
//   * workspaces of the sizes the *_chunks helpers give, allocated on the stream's device.
// Launchers only enqueue work on `stream`: no allocation, no host synchronization, no host copy
// of device values (CUDA-graph capturable). Each returns cudaGetLastError() after its launches.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "nk/chunk.h"

namespace nk_cuda {

// Element type of the tensors. The math type (Acc) is float for kHalf/kBFloat16/kFloat and
// double for kDouble; the reductions accumulate in double throughout, as the CPU kernels do.
enum class DType : int { kHalf, kBFloat16, kFloat, kDouble };

// Elements per chunk of the multi-tensor kernels (nk/chunk.h): each tensor of a list is cut into
// chunks of kChunk elements (the last one shorter), one thread block per chunk.
using nk::kChunk;

// Chunks of a list whose positions hold numel[0..P-1] elements (empty tensors have none): the
// reductions need a double workspace of 3 * list_chunks(...) (multi_dot, iga_ratio).
inline int64_t list_chunks(const int64_t* numel, int64_t P) {
  int64_t n = 0;
  for (int64_t p = 0; p < P; ++p) n += (numel[p] + kChunk - 1) / kChunk;
  return n;
}

// ---- design §1: out = x0 + sum_m ((w[m] * eta) * s[m, b]) * g_m ------------------------------
//
// Gradients are given either as a table (`grads`, M pointers, M <= kCfgMaxTable) or, when
// `grads` is null, as g_m = grad_base + m * grad_stride (a stacked (M, ...) tensor, any M).
// w: M values, s: M * B values (row-major (M, B)) or null; both in Acc. B > 1 only with s; then
// sample b owns elements [b * numel / B, (b + 1) * numel / B). out may equal x0 (in place); no
// other overlap of out with an input is allowed. Math in Acc, in the reference's order:
// acc = x0; acc = acc + c_m * g_m for m = 0..M-1 (products and sums rounded separately, no FMA);
// one rounding to the element type at the end.
constexpr int kCfgMaxTable = 64;

struct CfgArgs {
  void* out;
  const void* x0;
  const void* const* grads;  // host array of M device pointers, or null
  const void* grad_base;
  int64_t grad_stride;       // in elements
  int64_t M;
  const void* w;
  const void* s;
  int64_t B;
  double eta;
  int64_t numel;
};

cudaError_t cfg_accumulate(DType dtype, const CfgArgs& args, cudaStream_t stream);

// ---- design §4 ---------------------------------------------------------------------------------
//
// a[p], b[p]: P device pointers each (host arrays), numel[p] elements. Partial sums per chunk go
// to `partials` (3 * list_chunks(numel, P) doubles), then one block adds them in a fixed order.
// out: 3 values (<a,a>, <b,b>, <a,b>), float (double for kDouble).
cudaError_t multi_dot(DType dtype, const void* const* a, const void* const* b,
                      const int64_t* numel, int64_t P, double* partials, void* out,
                      cudaStream_t stream);

// Chunks of the sigmoid means of aw_weights: workspace of aw_weights_chunks(...) doubles.
inline int64_t aw_weights_chunks(int64_t n_real, int64_t n_fake) {
  return (n_real + kChunk - 1) / kChunk + (n_fake + kChunk - 1) / kChunk;
}

// dots: 3 values of dots_dtype; real/fake: n_real/n_fake (> 0) logits of their own dtypes.
// w_r, w_f: one value each of dots_dtype; case_id: one int64. The rule (nk/aw_rule.h) runs in
// double for kDouble dots, else in float, on device.
struct AwArgs {
  DType dots_dtype;
  const void* dots;
  DType real_dtype;
  const void* real;
  int64_t n_real;
  DType fake_dtype;
  const void* fake;
  int64_t n_fake;
  bool normalized;
  double alpha1, alpha2, delta, eps;
  double* partials;
  void* w_r;
  void* w_f;
  int64_t* case_id;
};

cudaError_t aw_weights(const AwArgs& args, cudaStream_t stream);

// out[p] = wa * a[p] + wb * b[p] elementwise, wa and wb read on device from one Acc value each
// (wa null means 1); wb is multiplied by wb_sign (+1 or -1, exact). out[p] may be a[p] or b[p]
// itself; no other overlap of an output with an input is allowed.
cudaError_t combine_lists(DType dtype, void* const* out, const void* const* a,
                          const void* const* b, const int64_t* numel, int64_t P,
                          const void* wa, const void* wb, double wb_sign, cudaStream_t stream);

// ---- design §5 ---------------------------------------------------------------------------------
//
// r = <gf, gF> / (<gf, gf> + eps): sums as multi_dot, the division in double, one rounding to
// float (double for kDouble). partials: 3 * list_chunks(numel, P) doubles.
cudaError_t iga_ratio(DType dtype, const void* const* gf, const void* const* gF,
                      const int64_t* numel, int64_t P, double eps, double* partials, void* out,
                      cudaStream_t stream);

// ---- design §3: median_pairwise_distance -------------------------------------------------------
//
// The exact lower median (rank (n - 1) // 2) of the squared Euclidean distances of the pairs
// i < j of the rows of x (y null), or of every row of x with every row of y, per batch element;
// then its square root unless `squared`. x: B * N * d contiguous elements (B problems of N rows),
// y: B * M * d or null; out: B values; all of `dtype`. Math in float32 (float64 for kDouble);
// a problem with NaN or Inf in its input gets NaN. Arguments as the op validates them: N >= 2
// pairwise, N, M >= 1 cross, d >= 0, memory_budget > 0 (it bounds the kept-key buffer; the
// scaled copies of the inputs come on top, as on the CPU). workspace: median_workspace_bytes(args)
// bytes on the stream's device, 256-byte aligned, contents irrelevant (the problems run one after
// the other on `stream` and reuse it). Every data-dependent decision is taken on the device.
struct MedianArgs {
  DType dtype;
  const void* x;
  const void* y;  // null: pairwise
  int64_t B, N, M, d;
  bool squared;
  int64_t memory_budget;
  void* out;
  void* workspace;
};

int64_t median_workspace_bytes(const MedianArgs& args);
cudaError_t median_pairwise_distance(const MedianArgs& args, cudaStream_t stream);

}  // namespace nk_cuda
