// CUDA kernel of design §5 (BRC / IGA): iga_ratio. iga_correction_ is combine_lists
// (aw_cuda.cu) with wa = 1 and wb = -r: g - r * gf as 1 * g + (-r) * gf, the same float
// operations (1 * x and the negation are exact), as the CPU kernel computes it.
#include "nk_cuda_lists.cuh"

namespace nk_cuda {
namespace {

// r = <gf, gF> / (<gf, gf> + eps): the float64 totals, the division in float64, one rounding to
// R (float, double for float64 inputs), as the CPU kernel.
template <typename R>
struct RatioOut {
  R* out;
  double eps;
  __device__ void operator()(const double* t) const {
    *out = static_cast<R>(t[2] / (t[0] + eps));
  }
};

}  // namespace

cudaError_t iga_ratio(DType dtype, const void* const* gf, const void* const* gF,
                      const int64_t* numel, int64_t P, double eps, double* partials, void* out,
                      cudaStream_t stream) {
  if (dtype == DType::kDouble) {
    return list_dots(dtype, gf, gF, numel, P, partials,
                     RatioOut<double>{static_cast<double*>(out), eps}, stream);
  }
  return list_dots(dtype, gf, gF, numel, P, partials,
                   RatioOut<float>{static_cast<float*>(out), eps}, stream);
}

}  // namespace nk_cuda
