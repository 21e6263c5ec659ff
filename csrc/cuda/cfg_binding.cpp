// The CUDA binding of design §1: cfg_accumulate (stacked and list forms) and cfg_step_, glue
// between the op schemas (csrc/nats_kernels.cpp) and nk_cuda::cfg_accumulate (cfg_cuda.cu).
// Layouts and overlap as binding_layout.h says; weights and scales stay on the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "binding_layout.h"

namespace nk_cuda {
namespace {

// grads: the M gradients, either as a stacked (M, ...) tensor or as a list; one of the two.
void cfg_run(const at::Tensor& x0, const at::Tensor* stacked, at::TensorList list,
             const at::Tensor& weights, double eta, const std::optional<at::Tensor>& scale,
             const at::Tensor& out) {
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t M = weights.numel();
  const int64_t N = out.numel();
  at::Tensor target = write_target(out, scale.has_value());
  const at::Tensor x = in_layout(x0, target);

  // Gradient operands: a table of M pointers, or (stacked, or more than a table holds) one
  // tensor of M equally spaced gradients in the target layout.
  std::vector<at::Tensor> table;
  at::Tensor stack;
  if (stacked != nullptr && same_layout(stacked->select(0, 0), target)) {
    stack = *stacked;
  } else if (M <= kCfgMaxTable) {
    table.reserve(M);
    for (int64_t m = 0; m < M; ++m) {
      table.push_back(in_layout(stacked != nullptr ? stacked->select(0, m) : list[m], target));
    }
  } else {
    std::vector<int64_t> sizes{M}, strides{N};
    sizes.insert(sizes.end(), target.sizes().begin(), target.sizes().end());
    strides.insert(strides.end(), target.strides().begin(), target.strides().end());
    stack = at::empty_strided(sizes, strides, out.options());
    for (int64_t m = 0; m < M; ++m) {
      stack.select(0, m).copy_(stacked != nullptr ? stacked->select(0, m) : list[m]);
    }
  }

  if (target.is_same(out)) {
    // One pass reads element i of every input before it writes element i of out: harmless when
    // out is the very same view as an input, wrong for any other overlap.
    bool hazard = nk::overlap_hazard(out, x);
    if (stack.defined()) hazard = hazard || nk::overlap_hazard(out, stack);
    for (const auto& g : table) hazard = hazard || nk::overlap_hazard(out, g);
    if (hazard) target = at::empty_strided(out.sizes(), out.strides(), out.options());
  }

  const at::ScalarType acc = acc_type(out.scalar_type());
  const at::Tensor w = private_if_aliased(weights.to(acc).contiguous(), target);
  at::Tensor s;
  if (scale.has_value()) s = private_if_aliased(scale->to(acc).contiguous(), target);

  std::vector<const void*> ptrs;
  for (const auto& g : table) ptrs.push_back(g.data_ptr());
  CfgArgs args{};
  args.out = target.data_ptr();
  args.x0 = x.data_ptr();
  args.grads = stack.defined() ? nullptr : ptrs.data();
  args.grad_base = stack.defined() ? stack.data_ptr() : nullptr;
  args.grad_stride = stack.defined() && M > 1 ? stack.stride(0) : 0;
  args.M = M;
  args.w = w.data_ptr();
  args.s = s.defined() ? s.data_ptr() : nullptr;
  args.B = s.defined() ? out.size(0) : 1;
  args.eta = eta;
  args.numel = N;
  C10_CUDA_CHECK(cfg_accumulate(dtype_of(out.scalar_type()), args, stream()));
  if (!target.is_same(out)) out.copy_(target);
}

void cfg_accumulate_cuda(const at::Tensor& x0, const at::Tensor& grads, const at::Tensor& weights,
                         double eta, const std::optional<at::Tensor>& scale,
                         const at::Tensor& out) {
  cfg_run(x0, &grads, {}, weights, eta, scale, out);
}

void cfg_accumulate_list_cuda(const at::Tensor& x0, at::TensorList grads,
                              const at::Tensor& weights, double eta,
                              const std::optional<at::Tensor>& scale, const at::Tensor& out) {
  cfg_run(x0, nullptr, grads, weights, eta, scale, out);
}

void cfg_step_cuda(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& weight,
                   double eta, const std::optional<at::Tensor>& scale) {
  std::optional<at::Tensor> s;
  if (scale.has_value()) s = scale->reshape({1, -1});
  cfg_run(x, nullptr, at::TensorList(grad), weight.reshape({1}), eta, s, x);
}

}  // namespace
}  // namespace nk_cuda

TORCH_LIBRARY_IMPL(nats_kernels_ext, CUDA, m) {
  m.impl("cfg_accumulate", &nk_cuda::cfg_accumulate_cuda);
  m.impl("cfg_accumulate_list", &nk_cuda::cfg_accumulate_list_cuda);
  m.impl("cfg_step_", &nk_cuda::cfg_step_cuda);
}
