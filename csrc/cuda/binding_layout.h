// The binding's layout and overlap policy, shared by the per-op glue (*_binding.cpp): dtype
// mapping, the current stream, and how each operand is handed to the launchers of nk_cuda.h.
//
// Memory layout. The kernels walk each tensor as `numel` elements from its data pointer, all
// operands of one position in step. So, per position, the tensor that is written (or, for a
// reduction, the first input) fixes the layout: when it is dense and non-overlapping (contiguous,
// channels_last, a permutation...) it is used as it is and every other operand must have the
// same strides; any operand that does not gets a copy in that layout first. A written tensor that
// is not dense (a strided view) is computed into a fresh contiguous tensor and copied back. For
// cfg with a per-sample scale the batch dim must also be the outermost one in memory, so that
// sample b is one run of numel / B elements. Copies are the exception (gradients are
// contiguous); they cost one extra pass each and no host synchronization.
//
// Overlap: the tests of nk/overlap.h, as in the CPU kernels. An output may be the very same view
// as an input (in place); an input that overlaps an output any other way is read from a private
// copy, or the output is computed into scratch memory and copied.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "nk/overlap.h"
#include "nk_cuda.h"

namespace nk_cuda {

inline DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return DType::kHalf;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kFloat:
      return DType::kFloat;
    case at::kDouble:
      return DType::kDouble;
    default:
      TORCH_CHECK(false, "nats_kernels CUDA kernels take float16, bfloat16, float32 or float64, "
                  "got ", t);
  }
}

// Math / result dtype of the kernels: float64 for float64, float32 otherwise (design §9.1).
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The kernels may walk t as numel() elements from data_ptr() (torch strides are >= 0, so the
// first element is the lowest address).
inline bool dense(const at::Tensor& t) { return t.is_non_overlapping_and_dense(); }

// Same shape and the same strides in every dim of size > 1 (size-1 dims never move a pointer).
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// t itself when it has the layout of `like` (a dense tensor), else a copy of t in that layout.
inline at::Tensor in_layout(const at::Tensor& t, const at::Tensor& like) {
  if (same_layout(t, like)) return t;
  return at::empty_strided(like.sizes(), like.strides(), t.options()).copy_(t);
}

// The tensor a kernel writes for `out`: out itself when dense (and, with a per-sample scale,
// batch-major: dim 0 outermost in memory), else a fresh contiguous tensor to copy back.
inline at::Tensor write_target(const at::Tensor& out, bool batch_major) {
  bool ok = dense(out);
  if (ok && batch_major && out.dim() > 0 && out.size(0) > 1) {
    ok = out.stride(0) == out.numel() / out.size(0);
  }
  return ok ? out : at::empty(out.sizes(), out.options());
}

// Small operands that every thread reads while outputs are written (weights, scales, w_r, w_f,
// r) get a private copy in the rare case that they share memory with an output.
inline at::Tensor private_if_aliased(const at::Tensor& t, at::TensorList outs) {
  for (const auto& o : outs) {
    if (o.numel() && t.numel() && t.storage().is_alias_of(o.storage())) return t.clone();
  }
  return t;
}

// Two input lists read side by side: a[p] as it is when dense (else contiguous), b[p] in a[p]'s
// layout. The tensors stay alive in this struct until the launches are enqueued.
struct InputPair {
  std::vector<at::Tensor> a, b;
  std::vector<const void*> pa, pb;
  std::vector<int64_t> numel;

  InputPair(at::TensorList a_in, at::TensorList b_in) {
    const size_t P = a_in.size();
    a.reserve(P);
    b.reserve(P);
    for (size_t p = 0; p < P; ++p) {
      a.push_back(dense(a_in[p]) ? a_in[p] : a_in[p].contiguous());
      b.push_back(in_layout(b_in[p], a.back()));
      pa.push_back(a[p].numel() ? a[p].data_ptr() : nullptr);
      pb.push_back(b[p].numel() ? b[p].data_ptr() : nullptr);
      numel.push_back(a[p].numel());
    }
  }
  int64_t size() const { return static_cast<int64_t>(numel.size()); }
  at::Tensor partials() const {
    const int64_t n = 3 * list_chunks(numel.data(), size());
    return at::empty({n}, a[0].options().dtype(at::kDouble));
  }
};

}  // namespace nk_cuda
