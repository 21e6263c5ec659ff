// C++ CPU kernels of design §4 (aw-loss): multi_dot, aw_weights, aw_combine_.
// Arguments arrive validated (nats_kernels/ops/aw.py). The weight rule itself lives in
// csrc/include/nk/aw_rule.h, shared with the CUDA kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "nk/aw_rule.h"
#include "nk_cpu_dots.h"
#include "nk_cpu_utils.h"

namespace nk_cpu {
namespace {

at::Tensor multi_dot_cpu(at::TensorList a, at::TensorList b) {
  const auto d = list_dots(a, b);
  auto res = at::empty({3}, a[0].options().dtype(at::kDouble));
  double* p = res.data_ptr<double>();
  for (int k = 0; k < 3; ++k) p[k] = d[k];
  return res.to(reduce_dtype(a[0].scalar_type()));
}

// mean(sigmoid(x)) in float64, with the same fixed chunking and in-order partial sums as the
// inner products (deterministic whatever the thread count).
double mean_sigmoid(const at::Tensor& x) {
  const ListPlan plan = make_plan({at::TensorList(x)});
  std::vector<double> part(static_cast<size_t>(plan.nchunks), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "aw_sigmoid", [&] {
    parallel_chunks(plan.nchunks, [&](int64_t c) {
      double s = 0;
      for_chunk<scalar_t>(plan, c, kChunk,
                          [&](int, scalar_t* const* p, const int64_t* st, int64_t n) {
        const scalar_t* v = p[0];
        const int64_t sv = st[0];
        for (int64_t j = 0; j < n; ++j) {
          s += 1.0 / (1.0 + std::exp(-static_cast<double>(v[j * sv])));
        }
      });
      part[c] = s;
    });
  });
  double total = 0;
  for (double s : part) total += s;
  return total / static_cast<double>(plan.total);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> aw_weights_impl(
    const at::Tensor& dots, double s_r, double s_f, bool normalized, double alpha1,
    double alpha2, double delta, double eps) {
  // The rule runs in float64 for float64 dots, else float32: the reference's math type (its
  // hyperparameters and sigmoid means are rounded to that type before they are compared).
  auto d = dots.to(at::kDouble).contiguous();
  const double* dp = d.data_ptr<double>();
  const nk::AwWeights<T> w = nk::aw_rule<T>(
      static_cast<T>(dp[0]), static_cast<T>(dp[1]), static_cast<T>(dp[2]), static_cast<T>(s_r),
      static_cast<T>(s_f), normalized, static_cast<T>(alpha1), static_cast<T>(alpha2),
      static_cast<T>(delta), static_cast<T>(eps));
  return {at::scalar_tensor(static_cast<double>(w.w_r), dots.options()),
          at::scalar_tensor(static_cast<double>(w.w_f), dots.options()),
          at::scalar_tensor(static_cast<int64_t>(w.case_id), dots.options().dtype(at::kLong))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aw_weights_cpu(
    const at::Tensor& dots, const at::Tensor& real_logits, const at::Tensor& fake_logits,
    bool normalized, double alpha1, double alpha2, double delta, double eps) {
  const double s_r = mean_sigmoid(real_logits);
  const double s_f = mean_sigmoid(fake_logits);
  if (dots.scalar_type() == at::kDouble) {
    return aw_weights_impl<double>(dots, s_r, s_f, normalized, alpha1, alpha2, delta, eps);
  }
  return aw_weights_impl<float>(dots, s_r, s_f, normalized, alpha1, alpha2, delta, eps);
}

// out[p] = w_r * g_r[p] + w_f * g_f[p] (out[p] may be g_r[p] or g_f[p] itself).
void aw_combine_cpu(at::TensorList out, at::TensorList g_r, at::TensorList g_f,
                    const at::Tensor& w_r, const at::Tensor& w_f) {
  combine_lists(out, g_r, g_f, read_scalar(w_r), read_scalar(w_f));
}

}  // namespace
}  // namespace nk_cpu

TORCH_LIBRARY_IMPL(nats_kernels_ext, CPU, m) {
  m.impl("multi_dot", &nk_cpu::multi_dot_cpu);
  m.impl("aw_weights", &nk_cpu::aw_weights_cpu);
  m.impl("aw_combine_", &nk_cpu::aw_combine_cpu);
}
