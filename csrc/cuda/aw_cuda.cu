// CUDA kernels of design §4 (aw-loss): multi_dot, aw_weights, and combine_lists (aw_combine_;
// iga_correction_ uses it too, as the CPU kernels share theirs). The weight rule itself is
// csrc/include/nk/aw_rule.h, the same code as the CPU kernel's, run here in one device thread:
// nothing is read back to the host.
#include <math.h>

#include "nk/aw_rule.h"
#include "nk_cuda_lists.cuh"

namespace nk_cuda {
namespace {

// multi_dot's result: the three totals rounded once to R (float, double for float64 inputs).
template <typename R>
struct DotsOut {
  R* out;
  __device__ void operator()(const double* t) const {
    out[0] = static_cast<R>(t[0]);
    out[1] = static_cast<R>(t[1]);
    out[2] = static_cast<R>(t[2]);
  }
};

// Per-chunk sums of sigmoid(x) in float64 over one contiguous tensor of n elements, chunk c
// (elements [c * kChunk, ...)) into partials[c]: the same chunking and fixed-order sums as the
// inner products.
template <typename T>
__global__ void __launch_bounds__(kThreads) sigmoid_partials_kernel(const T* __restrict__ x,
                                                                    int64_t n,
                                                                    double* __restrict__ partials) {
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {  // uniform per block
    const int64_t begin = c * kChunk;
    const int64_t rest = n - begin;
    const int len = static_cast<int>(rest < kChunk ? rest : kChunk);
    double s = 0;
    for (int i = threadIdx.x; i < len; i += kThreads) {
      s += 1.0 / (1.0 + exp(-to_double(x[begin + i])));
    }
    block_sum(s);
    if (threadIdx.x == 0) partials[c] = s;
  }
}

template <typename T>
cudaError_t sigmoid_partials(const void* x, int64_t n, double* partials, cudaStream_t stream) {
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  const int64_t grid = nchunks < 65536 ? nchunks : 65536;
  sigmoid_partials_kernel<T><<<static_cast<unsigned int>(grid), kThreads, 0, stream>>>(
      static_cast<const T*>(x), n, partials);
  return cudaGetLastError();
}

struct AwRuleParams {
  bool normalized;
  double alpha1, alpha2, delta, eps;
};

// One block: s_r, s_f from their partials (fixed-order sums, then / n in float64), and the
// rule of design §4 in the math type of the dots (double for float64 dots, else float), exactly
// as the CPU kernel rounds its inputs; weights written in the dots' dtype, the case as int64.
template <typename D>
__global__ void __launch_bounds__(kThreads) aw_rule_kernel(
    const D* __restrict__ dots, const double* __restrict__ partials, int64_t nc_real,
    int64_t n_real, int64_t nc_fake, int64_t n_fake, AwRuleParams prm, D* __restrict__ w_r,
    D* __restrict__ w_f, int64_t* __restrict__ case_id) {
  using T = acc_t<D>;
  double sr = 0, sf = 0, unused = 0;
  for (int64_t c = threadIdx.x; c < nc_real; c += kThreads) sr += partials[c];
  for (int64_t c = threadIdx.x; c < nc_fake; c += kThreads) sf += partials[nc_real + c];
  block_sum3(sr, sf, unused);
  if (threadIdx.x != 0) return;
  const double s_r = sr / static_cast<double>(n_real);
  const double s_f = sf / static_cast<double>(n_fake);
  const nk::AwWeights<T> w = nk::aw_rule<T>(
      to_acc(dots[0]), to_acc(dots[1]), to_acc(dots[2]), static_cast<T>(s_r),
      static_cast<T>(s_f), prm.normalized, static_cast<T>(prm.alpha1),
      static_cast<T>(prm.alpha2), static_cast<T>(prm.delta), static_cast<T>(prm.eps));
  *w_r = from_acc<D>(w.w_r);
  *w_f = from_acc<D>(w.w_f);
  *case_id = w.case_id;
}

}  // namespace

cudaError_t multi_dot(DType dtype, const void* const* a, const void* const* b,
                      const int64_t* numel, int64_t P, double* partials, void* out,
                      cudaStream_t stream) {
  if (dtype == DType::kDouble) {
    return list_dots(dtype, a, b, numel, P, partials, DotsOut<double>{static_cast<double*>(out)},
                     stream);
  }
  return list_dots(dtype, a, b, numel, P, partials, DotsOut<float>{static_cast<float*>(out)},
                   stream);
}

cudaError_t aw_weights(const AwArgs& args, cudaStream_t stream) {
  if (args.n_real <= 0 || args.n_fake <= 0) return cudaErrorInvalidValue;
  const int64_t nc_real = (args.n_real + kChunk - 1) / kChunk;
  const int64_t nc_fake = (args.n_fake + kChunk - 1) / kChunk;
  cudaError_t err = cudaSuccess;
  NK_DISPATCH_DTYPE(args.real_dtype,
                    err = sigmoid_partials<scalar_t>(args.real, args.n_real, args.partials,
                                                     stream));
  if (err != cudaSuccess) return err;
  NK_DISPATCH_DTYPE(args.fake_dtype,
                    err = sigmoid_partials<scalar_t>(args.fake, args.n_fake,
                                                     args.partials + nc_real, stream));
  if (err != cudaSuccess) return err;
  const AwRuleParams prm{args.normalized, args.alpha1, args.alpha2, args.delta, args.eps};
  NK_DISPATCH_DTYPE(args.dots_dtype, {
    aw_rule_kernel<scalar_t><<<1, kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(args.dots), args.partials, nc_real, args.n_real, nc_fake,
        args.n_fake, prm, static_cast<scalar_t*>(args.w_r), static_cast<scalar_t*>(args.w_f),
        args.case_id);
  });
  return cudaGetLastError();
}

cudaError_t combine_lists(DType dtype, void* const* out, const void* const* a,
                          const void* const* b, const int64_t* numel, int64_t P,
                          const void* wa, const void* wb, double wb_sign, cudaStream_t stream) {
  NK_DISPATCH_DTYPE(dtype,
                    return combine_launch<scalar_t>(out, a, b, numel, P, wa, wb, wb_sign, stream));
  return cudaErrorInvalidValue;
}

}  // namespace nk_cuda
