// CUDA kernel of design §1: cfg_accumulate (stacked and list forms) and cfg_step_ (M = 1).
//
//   out = x0 + sum_m c[m, b] * grads[m],   c[m, b] = (w[m] * eta) * s[m, b]
//
// One pass over memory: each thread owns groups of one 16-byte vector of elements (8 half /
// bfloat16, 4 float, 2 double), reads x0 and the M gradients of its group once, accumulates in
// the math type in registers in the reference's order (m = 0..M-1, product and sum rounded
// separately), and writes out once. Vector loads and stores when every pointer is 16-byte
// aligned (and, for a stacked gradient tensor, the step between gradients is a multiple of 16
// bytes), else the same groups element by element; the < 8 trailing elements that fill no group
// are done one by one. The per-sample factor needs the sample of each element: one division
// per group, and per element only where a group straddles two samples.
#include "nk_cuda_common.cuh"

namespace nk_cuda {
namespace {

template <typename T>
struct CfgKernelArgs {
  using A = acc_t<T>;
  T* out;
  const T* x0;
  const T* table[kCfgMaxTable];  // g_m = table[m] when use_table
  const T* grad_base;            // else g_m = grad_base + m * grad_stride
  int64_t grad_stride;
  int64_t M;
  const A* w;                    // (M,)
  const A* s;                    // (M, B) or null
  int64_t B;
  int64_t row;                   // elements per sample: numel / B
  int64_t numel;
  A eta;
  bool use_table;
};

template <typename T>
__device__ __forceinline__ const T* grad_ptr(const CfgKernelArgs<T>& a, int64_t m) {
  return a.use_table ? a.table[m] : a.grad_base + m * a.grad_stride;
}

// (w[m] * eta) * s[m, r], as the reference computes its coefficients.
template <typename T>
__device__ __forceinline__ acc_t<T> coef(const CfgKernelArgs<T>& a, int64_t m, int64_t r) {
  const acc_t<T> c = mul_rn(a.w[m], a.eta);
  return a.s != nullptr ? mul_rn(c, a.s[m * a.B + r]) : c;
}

template <typename T, bool kVec>
__device__ __forceinline__ Vec<T> load_group(const T* p, int64_t i0) {
  if constexpr (kVec) {
    return load_vec(p + i0);
  } else {
    Vec<T> v;
#pragma unroll
    for (int k = 0; k < kVecWidth<T>; ++k) v.v[k] = p[i0 + k];
    return v;
  }
}

template <typename T, bool kVec>
__device__ __forceinline__ void store_group(T* p, int64_t i0, const Vec<T>& v) {
  if constexpr (kVec) {
    store_vec(p + i0, v);
  } else {
#pragma unroll
    for (int k = 0; k < kVecWidth<T>; ++k) p[i0 + k] = v.v[k];
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) cfg_kernel(const CfgKernelArgs<T> a) {
  using A = acc_t<T>;
  constexpr int V = kVecWidth<T>;
  const int64_t ngroups = a.numel / V;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * kThreads;

  for (int64_t g = tid; g < ngroups; g += nthreads) {
    const int64_t i0 = g * V;
    A acc[V];
    {
      const Vec<T> x = load_group<T, kVec>(a.x0, i0);
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] = to_acc(x.v[k]);
    }
    const int64_t r0 = a.s != nullptr ? i0 / a.row : 0;
    if (a.s == nullptr || i0 + V <= (r0 + 1) * a.row) {
      // The whole group lies in sample r0: one coefficient per step.
      for (int64_t m = 0; m < a.M; ++m) {
        const A c = coef(a, m, r0);
        const Vec<T> gv = load_group<T, kVec>(grad_ptr(a, m), i0);
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] = add_rn(acc[k], mul_rn(c, to_acc(gv.v[k])));
      }
    } else {
      int64_t r[V];
      int64_t rk = r0;
      int64_t next = (r0 + 1) * a.row;  // first element of the following sample
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (i0 + k >= next) {
          rk = (i0 + k) / a.row;
          next = (rk + 1) * a.row;
        }
        r[k] = rk;
      }
      for (int64_t m = 0; m < a.M; ++m) {
        const Vec<T> gv = load_group<T, kVec>(grad_ptr(a, m), i0);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          acc[k] = add_rn(acc[k], mul_rn(coef(a, m, r[k]), to_acc(gv.v[k])));
        }
      }
    }
    Vec<T> o;
#pragma unroll
    for (int k = 0; k < V; ++k) o.v[k] = from_acc<T>(acc[k]);
    store_group<T, kVec>(a.out, i0, o);
  }

  // Trailing elements that fill no group (fewer than V): one thread each.
  const int64_t i = ngroups * V + tid;
  if (i < a.numel) {
    const int64_t r = a.s != nullptr ? i / a.row : 0;
    A acc = to_acc(a.x0[i]);
    for (int64_t m = 0; m < a.M; ++m) {
      acc = add_rn(acc, mul_rn(coef(a, m, r), to_acc(grad_ptr(a, m)[i])));
    }
    a.out[i] = from_acc<T>(acc);
  }
}

template <typename T>
cudaError_t cfg_launch(const CfgArgs& in, cudaStream_t stream) {
  using A = acc_t<T>;
  if (in.numel == 0) return cudaSuccess;
  if (in.grads != nullptr && (in.M > kCfgMaxTable || in.M < 0)) return cudaErrorInvalidValue;
  if (in.s == nullptr && in.B != 1) return cudaErrorInvalidValue;
  if (in.B < 1 || in.numel % in.B != 0) return cudaErrorInvalidValue;

  CfgKernelArgs<T> a{};
  a.out = static_cast<T*>(in.out);
  a.x0 = static_cast<const T*>(in.x0);
  a.M = in.M;
  a.w = static_cast<const A*>(in.w);
  a.s = static_cast<const A*>(in.s);
  a.B = in.B;
  a.row = in.numel / in.B;
  a.numel = in.numel;
  a.eta = static_cast<A>(in.eta);
  bool vec = aligned16(a.out) && aligned16(a.x0);
  a.use_table = in.grads != nullptr;
  if (a.use_table) {
    for (int64_t m = 0; m < in.M; ++m) {
      a.table[m] = static_cast<const T*>(in.grads[m]);
      vec = vec && aligned16(a.table[m]);
    }
  } else {
    a.grad_base = static_cast<const T*>(in.grad_base);
    a.grad_stride = in.grad_stride;
    vec = vec && aligned16(a.grad_base) &&
          (in.grad_stride * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  }
  constexpr int V = kVecWidth<T>;
  const int64_t ngroups = in.numel / V;
  const unsigned int grid = grid_for(ngroups > 0 ? ngroups : 1);
  if (vec) {
    cfg_kernel<T, true><<<grid, kThreads, 0, stream>>>(a);
  } else {
    cfg_kernel<T, false><<<grid, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t cfg_accumulate(DType dtype, const CfgArgs& args, cudaStream_t stream) {
  NK_DISPATCH_DTYPE(dtype, return cfg_launch<scalar_t>(args, stream));
  return cudaErrorInvalidValue;
}

}  // namespace nk_cuda
