// Device helpers shared by the .cu files: element types and their math type, conversions,
// 16-byte vector loads and stores, IEEE arithmetic that is never contracted into an FMA, a
// deterministic block sum, and the DType -> element type switch of the launchers.
//
// Compiles with nvcc alone and under the flags torch's CUDAExtension adds
// (-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ ...): half and bfloat16 values
// are only ever converted with the explicit intrinsics below.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "nk_cuda.h"

namespace nk_cuda {

constexpr int kThreads = 256;  // threads per block of every kernel (the block sums assume it)
constexpr int kWarps = kThreads / 32;

// Math type: float for float16 / bfloat16 / float32, double for float64 (design §9.1).
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

// Element -> math type (exact: every element type widens exactly into its math type).
template <typename T> __device__ __forceinline__ acc_t<T> to_acc(T v) { return to_float(v); }
template <> __device__ __forceinline__ double to_acc<double>(double v) { return v; }

// Element -> double (exact), for the float64 reductions.
template <typename T> __device__ __forceinline__ double to_double(T v) {
  return static_cast<double>(to_acc(v));
}

// Math type -> element, round to nearest even (what torch's casts do).
template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> v);
template <> __device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

// Products and sums rounded one at a time, as the PyTorch reference computes them: nvcc would
// otherwise contract a + b * c into one FMA (a different rounding). The _rn intrinsics are never
// contracted, whatever --fmad says.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// Elements per 16-byte vector: 8 half / bfloat16, 4 float, 2 double.
template <typename T> constexpr int kVecWidth = static_cast<int>(16 / sizeof(T));

template <typename T>
struct alignas(16) Vec {
  T v[kVecWidth<T>];
};

template <typename T> __device__ __forceinline__ Vec<T> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T>*>(p);
}
template <typename T> __device__ __forceinline__ void store_vec(T* p, const Vec<T>& v) {
  *reinterpret_cast<Vec<T>*>(p) = v;
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Sum of one double per thread over a block of kThreads threads; the result is valid in thread
// 0. Fixed shape (shuffle tree within each warp, then the warp sums in warp order), so the same
// inputs give the same bits on every run. Contains __syncthreads: call from every thread.
__device__ __forceinline__ void block_sum3(double& a, double& b, double& c) {
  __shared__ double smem[3][kWarps];
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
    c += __shfl_down_sync(0xffffffffu, c, off);
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) {
    smem[0][warp] = a;
    smem[1][warp] = b;
    smem[2][warp] = c;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a = smem[0][0];
    b = smem[1][0];
    c = smem[2][0];
    for (int w = 1; w < kWarps; ++w) {
      a += smem[0][w];
      b += smem[1][w];
      c += smem[2][w];
    }
  }
  __syncthreads();  // smem may be reused by a following call
}

__device__ __forceinline__ void block_sum(double& a) {
  double unused_b = 0, unused_c = 0;
  block_sum3(a, unused_b, unused_c);
}

// Grid size for a grid-stride loop over `work` items of one thread each, capped far below the
// 2^31 - 1 limit of gridDim.x (the loops stride by gridDim.x * blockDim.x in int64).
inline unsigned int grid_for(int64_t work) {
  constexpr int64_t kMaxBlocks = int64_t{1} << 16;
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

}  // namespace nk_cuda

// Runs the statement list that follows with `scalar_t` bound to the element type of `dtype`.
#define NK_DISPATCH_DTYPE(dtype, ...)                                       \
  switch (dtype) {                                                          \
    NK_DTYPE_CASE(::nk_cuda::DType::kHalf, __half, __VA_ARGS__)             \
    NK_DTYPE_CASE(::nk_cuda::DType::kBFloat16, __nv_bfloat16, __VA_ARGS__)  \
    NK_DTYPE_CASE(::nk_cuda::DType::kFloat, float, __VA_ARGS__)             \
    NK_DTYPE_CASE(::nk_cuda::DType::kDouble, double, __VA_ARGS__)           \
    default:                                                                \
      return cudaErrorInvalidValue;                                         \
  }

// One case of NK_DISPATCH_DTYPE.
#define NK_DTYPE_CASE(tag, type, ...) \
  case tag: {                         \
    using scalar_t = type;            \
    __VA_ARGS__;                      \
  } break;
