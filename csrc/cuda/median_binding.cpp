// The CUDA binding of design §3: median_pairwise_distance, glue between the op schema
// (csrc/nats_kernels.cpp) and nk_cuda::median_pairwise_distance (median_cuda.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "binding_layout.h"

namespace nk_cuda {
namespace {

// x: (B, N, d), y: (B, M, d) or None, one floating dtype, validated by ops/median.py. The result
// (B,) in x's dtype; the workspace (scaled copies, sample, kept keys, device state) comes from
// torch's allocator, sized by the launcher's plan. Nothing is read back to the host.
at::Tensor median_pairwise_distance_cuda(const at::Tensor& x, const std::optional<at::Tensor>& y,
                                         bool squared, int64_t memory_budget) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({x.size(0)}, x.options());
  if (x.size(0) == 0) return out;
  const at::Tensor xc = x.contiguous();
  at::Tensor yc;
  if (y.has_value()) yc = y->contiguous();
  MedianArgs args{};
  args.dtype = dtype_of(x.scalar_type());
  args.x = xc.data_ptr();
  args.y = yc.defined() ? yc.data_ptr() : nullptr;
  args.B = x.size(0);
  args.N = x.size(1);
  args.M = yc.defined() ? yc.size(1) : 0;
  args.d = x.size(2);
  args.squared = squared;
  args.memory_budget = memory_budget;
  args.out = out.data_ptr();
  const at::Tensor workspace =
      at::empty({median_workspace_bytes(args)}, x.options().dtype(at::kByte));
  args.workspace = workspace.data_ptr();
  C10_CUDA_CHECK(median_pairwise_distance(args, stream()));
  return out;
}

}  // namespace
}  // namespace nk_cuda

TORCH_LIBRARY_IMPL(nats_kernels_ext, CUDA, m) {
  m.impl("median_pairwise_distance", &nk_cuda::median_pairwise_distance_cuda);
}
