// C++ CPU kernels of SPEC §5 (BRC / IGA): iga_ratio and iga_correction_.
// Arguments arrive validated (nats_kernels/ops/iga.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "nk_cpu_dots.h"
#include "nk_cpu_utils.h"

namespace nk_cpu {
namespace {

// r = <gf, gF> / (<gf, gf> + eps): float64 sums (deterministic, see nk_cpu_dots.h), the
// division in float64, one rounding to float32 (float64 for float64 inputs).
at::Tensor iga_ratio_cpu(at::TensorList gf, at::TensorList gF, double eps) {
  const auto d = list_dots(gf, gF);
  const double r = d[2] / (d[0] + eps);
  return at::scalar_tensor(r, gf[0].options().dtype(reduce_dtype(gf[0].scalar_type())));
}

// g[p] = g[p] - r * gf[p], r rounded to the math type first (as the reference's r.to(acc)).
void iga_correction_cpu(at::TensorList g, at::TensorList gf_in, const at::Tensor& r_t) {
  const std::vector<at::Tensor> gf = safe_inputs(g, gf_in);
  const ListPlan plan = make_plan({g, gf});
  const double r_value = r_t.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g[0].scalar_type(), "iga_corr", [&] {
    using A = acc_t<scalar_t>;
    const A r = static_cast<A>(r_value);
    parallel_chunks(plan.nchunks, [&](int64_t c) {
      for_chunk<scalar_t>(plan, c, kChunk,
                          [&](int, scalar_t* const* p, const int64_t* st, int64_t n) {
        scalar_t* x = p[0];
        const scalar_t* y = p[1];
        if (st[0] == 1 && st[1] == 1) {
          for (int64_t j = 0; j < n; ++j) {
            x[j] = static_cast<scalar_t>(static_cast<A>(x[j]) - r * static_cast<A>(y[j]));
          }
        } else {
          const int64_t sx = st[0], sy = st[1];
          for (int64_t j = 0; j < n; ++j) {
            x[j * sx] = static_cast<scalar_t>(static_cast<A>(x[j * sx]) -
                                              r * static_cast<A>(y[j * sy]));
          }
        }
      });
    });
  });
}

}  // namespace
}  // namespace nk_cpu

TORCH_LIBRARY_IMPL(nats_kernels_ext, CPU, m) {
  m.impl("iga_ratio", &nk_cpu::iga_ratio_cpu);
  m.impl("iga_correction_", &nk_cpu::iga_correction_cpu);
}
