// The torch side of the CUDA kernels: registers them for the CUDA dispatch key of the
// kernel-level ops (csrc/nats_kernels.cpp), maps dtypes, allocates outputs and workspaces with
// torch's caching allocator, and launches on the current stream of the tensors' device.
// Arguments arrive validated (nats_kernels/ops/*.py); the kernels are in csrc/cuda/*.cu.
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
// Overlap: as the CPU kernels (nk_cpu_utils.h, whose overlap tests this file reuses), an output
// may be the very same view as an input (in place); an input that overlaps an output any other
// way is read from a private copy, or the output is computed into scratch memory and copied.
//
// No op reads a device value on the host: weights, scales, w_r, w_f and r stay on the device.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../cpu/nk_cpu_utils.h"
#include "nk_cuda.h"

namespace nk_cuda {
namespace {

DType dtype_of(at::ScalarType t) {
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
at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The kernels may walk t as numel() elements from data_ptr() (torch strides are >= 0, so the
// first element is the lowest address).
bool dense(const at::Tensor& t) { return t.is_non_overlapping_and_dense(); }

// Same shape and the same strides in every dim of size > 1 (size-1 dims never move a pointer).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// t itself when it has the layout of `like` (a dense tensor), else a copy of t in that layout.
at::Tensor in_layout(const at::Tensor& t, const at::Tensor& like) {
  if (same_layout(t, like)) return t;
  return at::empty_strided(like.sizes(), like.strides(), t.options()).copy_(t);
}

// The tensor a kernel writes for `out`: out itself when dense (and, with a per-sample scale,
// batch-major: dim 0 outermost in memory), else a fresh contiguous tensor to copy back.
at::Tensor write_target(const at::Tensor& out, bool batch_major) {
  bool ok = dense(out);
  if (ok && batch_major && out.dim() > 0 && out.size(0) > 1) {
    ok = out.stride(0) == out.numel() / out.size(0);
  }
  return ok ? out : at::empty(out.sizes(), out.options());
}

// Small operands that every thread reads while outputs are written (weights, scales, w_r, w_f,
// r) get a private copy in the rare case that they share memory with an output.
at::Tensor private_if_aliased(const at::Tensor& t, at::TensorList outs) {
  for (const auto& o : outs) {
    if (o.numel() && t.numel() && t.storage().is_alias_of(o.storage())) return t.clone();
  }
  return t;
}

// ---- design §1 ---------------------------------------------------------------------------------

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
    bool hazard = nk_cpu::overlap_hazard(out, x);
    if (stack.defined()) hazard = hazard || nk_cpu::overlap_hazard(out, stack);
    for (const auto& g : table) hazard = hazard || nk_cpu::overlap_hazard(out, g);
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

// ---- Lists (design §4, §5) ---------------------------------------------------------------------

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
  a = nk_cpu::safe_inputs(target, a);
  b = nk_cpu::safe_inputs(target, b);

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

// ---- design §3 ---------------------------------------------------------------------------------

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
  m.impl("cfg_accumulate", &nk_cuda::cfg_accumulate_cuda);
  m.impl("cfg_accumulate_list", &nk_cuda::cfg_accumulate_list_cuda);
  m.impl("cfg_step_", &nk_cuda::cfg_step_cuda);
  m.impl("median_pairwise_distance", &nk_cuda::median_pairwise_distance_cuda);
  m.impl("multi_dot", &nk_cuda::multi_dot_cuda);
  m.impl("aw_weights", &nk_cuda::aw_weights_cuda);
  m.impl("aw_combine_", &nk_cuda::aw_combine_cuda);
  m.impl("iga_ratio", &nk_cuda::iga_ratio_cuda);
  m.impl("iga_correction_", &nk_cuda::iga_correction_cuda);
}

// Importing nats_kernels._cuda runs the registrations above; the module itself has no functions.
static struct PyModuleDef nats_kernels_cuda_module = {
    PyModuleDef_HEAD_INIT, "_cuda", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__cuda(void) { return PyModule_Create(&nats_kernels_cuda_module); }
