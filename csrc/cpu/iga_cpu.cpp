// C++ CPU kernels of design §5 (BRC / IGA): iga_ratio and iga_correction_.
// Arguments arrive validated (nats_kernels/ops/iga.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "nk_cpu_dots.h"
#include "nk_cpu_utils.h"

namespace nk_cpu {
namespace {

// r = <gf, gF> / (<gf, gf> + eps): float64 sums (deterministic, see nk_cpu_dots.h; the
// <gF, gF> that multi_dot also computes is skipped), the division in float64, one rounding to
// float32 (float64 for float64 inputs).
at::Tensor iga_ratio_cpu(at::TensorList gf, at::TensorList gF, double eps) {
  const auto d = list_dots</*kBB=*/false>(gf, gF);
  const double r = d[2] / (d[0] + eps);
  return at::scalar_tensor(r, gf[0].options().dtype(reduce_dtype(gf[0].scalar_type())));
}

// g[p] = g[p] - r * gf[p], as 1 * g[p] + (-r) * gf[p]: the same float operations (1 * x and
// the negation are exact), computed by the list kernel aw_combine_ uses.
void iga_correction_cpu(at::TensorList g, at::TensorList gf, const at::Tensor& r) {
  combine_lists(g, g, gf, 1.0, -read_scalar(r));
}

}  // namespace
}  // namespace nk_cpu

TORCH_LIBRARY_IMPL(nats_kernels_ext, CPU, m) {
  m.impl("iga_ratio", &nk_cpu::iga_ratio_cpu);
  m.impl("iga_correction_", &nk_cpu::iga_correction_cpu);
}
