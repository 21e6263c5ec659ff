// The CUDA binding of the list ops of design §4 and §5: multi_dot, aw_weights, aw_combine_,
// iga_ratio and iga_correction_, glue between the op schemas (csrc/nats_kernels.cpp) and the
// launchers of aw_cuda.cu and iga_cuda.cu. Layouts and overlap as binding_layout.h says; w_r,
// w_f and r stay on the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "binding_layout.h"

namespace nk_cuda {
namespace {

at::Tensor multi_dot_cuda(at::TensorList a, at::TensorList b) {
  const c10::cuda::CUDAGuard guard(a[0].device());
  const InputPair in(a, b);
  const at::Tensor partials = in.partials();
  at::Tensor out = at::empty({3}, a[0].options().dtype(acc_type(a[0].scalar_type())));
  C10_CUDA_CHECK(multi_dot(dtype_of(a[0].scalar_type()), in.pa.data(), in.pb.data(),
                           in.numel.data(), in.size(), partials.data_ptr<double>(),
                           out.data_ptr(), stream()));
  return out;
}

at::Tensor iga_ratio_cuda(at::TensorList gf, at::TensorList gF, double eps) {
  const c10::cuda::CUDAGuard guard(gf[0].device());
  const InputPair in(gf, gF);
  const at::Tensor partials = in.partials();
  at::Tensor out = at::empty({}, gf[0].options().dtype(acc_type(gf[0].scalar_type())));
  C10_CUDA_CHECK(iga_ratio(dtype_of(gf[0].scalar_type()), in.pa.data(), in.pb.data(),
                           in.numel.data(), in.size(), eps, partials.data_ptr<double>(),
                           out.data_ptr(), stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aw_weights_cuda(
    const at::Tensor& dots, const at::Tensor& real_logits, const at::Tensor& fake_logits,
    bool normalized, double alpha1, double alpha2, double delta, double eps) {
  const c10::cuda::CUDAGuard guard(dots.device());
  const at::Tensor d = dots.contiguous();
  const at::Tensor real = dense(real_logits) ? real_logits : real_logits.contiguous();
  const at::Tensor fake = dense(fake_logits) ? fake_logits : fake_logits.contiguous();
  const at::Tensor partials = at::empty({aw_weights_chunks(real.numel(), fake.numel())},
                                        dots.options().dtype(at::kDouble));
  at::Tensor w_r = at::empty({}, dots.options());
  at::Tensor w_f = at::empty({}, dots.options());
  at::Tensor case_id = at::empty({}, dots.options().dtype(at::kLong));
  AwArgs args{};
  args.dots_dtype = dtype_of(d.scalar_type());
  args.dots = d.data_ptr();
  args.real_dtype = dtype_of(real.scalar_type());
  args.real = real.data_ptr();
  args.n_real = real.numel();
  args.fake_dtype = dtype_of(fake.scalar_type());
  args.fake = fake.data_ptr();
  args.n_fake = fake.numel();
  args.normalized = normalized;
  args.alpha1 = alpha1;
  args.alpha2 = alpha2;
  args.delta = delta;
  args.eps = eps;
  args.partials = partials.data_ptr<double>();
  args.w_r = w_r.data_ptr();
  args.w_f = w_f.data_ptr();
  args.case_id = case_id.data_ptr<int64_t>();
  C10_CUDA_CHECK(aw_weights(args, stream()));
  return {w_r, w_f, case_id};
}

// out[p] = wa * a[p] + (wb_sign * wb) * b[p]; wa null means 1.
void combine(at::TensorList out, at::TensorList a_in, at::TensorList b_in, const at::Tensor* wa,
             const at::Tensor& wb, double wb_sign) {
  const c10::cuda::CUDAGuard guard(out[0].device());
  const size_t P = out.size();
  std::vector<at::Tensor> target, a, b;
  target.reserve(P);
  a.reserve(P);
  b.reserve(P);
  for (size_t p = 0; p < P; ++p) {
    target.push_back(write_target(out[p], false));
    a.push_back(in_layout(a_in[p], target[p]));
    b.push_back(in_layout(b_in[p], target[p]));
  }
  a = nk::safe_inputs(target, a);
  b = nk::safe_inputs(target, b);

  const at::ScalarType acc = acc_type(out[0].scalar_type());
  const at::Tensor wa_t = wa != nullptr ? private_if_aliased(wa->to(acc), target) : at::Tensor();
  const at::Tensor wb_t = private_if_aliased(wb.to(acc), target);

  std::vector<void*> po(P);
  std::vector<const void*> pa(P), pb(P);
  std::vector<int64_t> numel(P);
  for (size_t p = 0; p < P; ++p) {
    numel[p] = target[p].numel();
    po[p] = numel[p] ? target[p].data_ptr() : nullptr;
    pa[p] = numel[p] ? a[p].data_ptr() : nullptr;
    pb[p] = numel[p] ? b[p].data_ptr() : nullptr;
  }
  C10_CUDA_CHECK(combine_lists(dtype_of(out[0].scalar_type()), po.data(), pa.data(), pb.data(),
                               numel.data(), static_cast<int64_t>(P),
                               wa_t.defined() ? wa_t.data_ptr() : nullptr, wb_t.data_ptr(),
                               wb_sign, stream()));
  for (size_t p = 0; p < P; ++p) {
    if (!target[p].is_same(out[p])) out[p].copy_(target[p]);
  }
}

void aw_combine_cuda(at::TensorList out, at::TensorList g_r, at::TensorList g_f,
                     const at::Tensor& w_r, const at::Tensor& w_f) {
  combine(out, g_r, g_f, &w_r, w_f, 1.0);
}

// g[p] = g[p] - r * gf[p], as 1 * g[p] + (-r) * gf[p] (exactly the same float operations).
void iga_correction_cuda(at::TensorList g, at::TensorList gf, const at::Tensor& r) {
  combine(g, g, gf, nullptr, r, -1.0);
}

}  // namespace
}  // namespace nk_cuda

TORCH_LIBRARY_IMPL(nats_kernels_ext, CUDA, m) {
  m.impl("multi_dot", &nk_cuda::multi_dot_cuda);
  m.impl("aw_weights", &nk_cuda::aw_weights_cuda);
  m.impl("aw_combine_", &nk_cuda::aw_combine_cuda);
  m.impl("iga_ratio", &nk_cuda::iga_ratio_cuda);
  m.impl("iga_correction_", &nk_cuda::iga_correction_cuda);
}
