// The multi-tensor machinery and the two list kernels shared by aw_cuda.cu and iga_cuda.cu
// (the CUDA side of csrc/cpu/nk_cpu_dots.h):
//  * dots: the deterministic three-way inner product (<a,a>, <b,b>, <a,b>) in float64, for
//    multi_dot and iga_ratio;
//  * combine: out[p] = wa * a[p] + wb * b[p], for aw_combine_ and iga_correction_.
//
// Chunking, as PyTorch's MultiTensorApply does it: every tensor of a list is cut into chunks of
// kChunk elements (chunk k of a tensor starts at element k * kChunk, so a chunk is 16-byte
// aligned whenever its tensor is), and one thread block handles one chunk. The host walks the
// list once and fills a table (base pointers, sizes, block -> (tensor, chunk)) that travels by
// value in the kernel arguments (< 4 KiB); a list larger than one table goes out in several
// launches on the stream. No device buffer of metadata, no host-to-device copy, no host sync,
// so the launches can be captured in a CUDA graph.
//
// Determinism: the partial sums of a chunk are fixed by the chunking (which depends only on the
// sizes) and by the fixed block shape; each chunk writes its three float64 partials to its own
// slot (its global chunk number), and one block of a second kernel adds the slots in a fixed
// order. No atomics: the same inputs give the same bits on every run.
//
// Included by several .cu files: everything here has internal linkage (anonymous namespace).
#pragma once

#include "nk_cuda_common.cuh"

namespace nk_cuda {
namespace {

constexpr int kListMaxBlocks = 320;

// Kernel-argument table for one launch over NOPS operand lists. 36 tensors of 3 operands or 48
// of 2: about 2.8 KiB either way, below the 4 KiB kernel-parameter limit of every CUDA version.
template <int NOPS>
struct ListMeta {
  static constexpr int kMaxTensors = NOPS == 2 ? 48 : 36;
  void* ptr[NOPS][kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t first_chunk;              // global chunk number of block 0 (partials slot)
  int32_t chunk[kListMaxBlocks];    // chunk number within its tensor
  uint8_t tensor[kListMaxBlocks];   // slot in ptr / numel
};

// Fills ListMeta tables for the lists lists[op][p] (host arrays of P device pointers, one per
// operand; position p holds numel[p] elements) and calls launch(meta, nblocks) -> cudaError_t
// for each table, stopping at the first error; empty tensors are skipped. Blocks are numbered in list order, so the global chunk number of
// block j of a launch is meta.first_chunk + j.
template <int NOPS, typename Launch>
cudaError_t for_each_list_batch(const void* const* const* lists, const int64_t* numel,
                                int64_t P, Launch&& launch) {
  using Meta = ListMeta<NOPS>;
  Meta meta{};
  int nt = 0;  // tensors in the table
  int nb = 0;  // blocks in the table
  for (int64_t p = 0; p < P; ++p) {
    const int64_t n = numel[p];
    if (n <= 0) continue;
    int slot = nt++;
    for (int op = 0; op < NOPS; ++op) meta.ptr[op][slot] = const_cast<void*>(lists[op][p]);
    meta.numel[slot] = n;
    const int64_t nchunks = (n + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < nchunks; ++c) {
      meta.tensor[nb] = static_cast<uint8_t>(slot);
      meta.chunk[nb] = static_cast<int32_t>(c);
      ++nb;
      const bool last = c + 1 == nchunks;
      if (nb == kListMaxBlocks || (last && nt == Meta::kMaxTensors)) {
        const cudaError_t err = launch(meta, nb);
        if (err != cudaSuccess) return err;
        meta.first_chunk += nb;
        nb = 0;
        if (last) {
          nt = 0;
        } else {  // this tensor goes on in the next table, as its slot 0
          for (int op = 0; op < NOPS; ++op) meta.ptr[op][0] = meta.ptr[op][slot];
          meta.numel[0] = n;
          slot = 0;
          nt = 1;
        }
      }
    }
  }
  return nb > 0 ? launch(meta, nb) : cudaSuccess;
}

// Chunk of block `blockIdx.x`: its first element and length (<= kChunk).
template <int NOPS>
__device__ __forceinline__ void block_chunk(const ListMeta<NOPS>& meta, int& slot,
                                            int64_t& begin, int& len) {
  slot = meta.tensor[blockIdx.x];
  begin = static_cast<int64_t>(meta.chunk[blockIdx.x]) * kChunk;
  const int64_t rest = meta.numel[slot] - begin;
  len = static_cast<int>(rest < kChunk ? rest : kChunk);
}

template <typename T>
__device__ __forceinline__ void dot_step(T xt, T yt, double& aa, double& bb, double& ab) {
  const double x = to_double(xt);
  const double y = to_double(yt);
  aa = add_rn(aa, mul_rn(x, x));
  bb = add_rn(bb, mul_rn(y, y));
  ab = add_rn(ab, mul_rn(x, y));
}

// partials[3 * g + k], g = the block's global chunk number: the chunk's three sums in float64.
template <typename T>
__global__ void __launch_bounds__(kThreads) dots_kernel(const ListMeta<2> meta,
                                                        double* __restrict__ partials) {
  constexpr int V = kVecWidth<T>;
  int slot, len;
  int64_t begin;
  block_chunk(meta, slot, begin, len);
  const T* x = static_cast<const T*>(meta.ptr[0][slot]) + begin;
  const T* y = static_cast<const T*>(meta.ptr[1][slot]) + begin;
  double aa = 0, bb = 0, ab = 0;
  int i = threadIdx.x;
  if (aligned16(x) && aligned16(y)) {  // the same for the whole block
    const int nvec = len / V;
    for (int j = threadIdx.x; j < nvec; j += kThreads) {
      const Vec<T> xv = load_vec(x + static_cast<int64_t>(j) * V);
      const Vec<T> yv = load_vec(y + static_cast<int64_t>(j) * V);
#pragma unroll
      for (int k = 0; k < V; ++k) dot_step(xv.v[k], yv.v[k], aa, bb, ab);
    }
    i = nvec * V + threadIdx.x;
  }
  for (; i < len; i += kThreads) dot_step(x[i], y[i], aa, bb, ab);
  block_sum3(aa, bb, ab);
  if (threadIdx.x == 0) {
    double* out = partials + 3 * (meta.first_chunk + blockIdx.x);
    out[0] = aa;
    out[1] = bb;
    out[2] = ab;
  }
}

// One block: the totals of nchunks partials (each thread adds the slots t, t + kThreads, ... in
// order, then the fixed block sum), handed to epilogue(total) in thread 0.
template <typename Epilogue>
__global__ void __launch_bounds__(kThreads) dots_finalize_kernel(
    const double* __restrict__ partials, int64_t nchunks, Epilogue epilogue) {
  double t[3] = {0, 0, 0};
  for (int64_t c = threadIdx.x; c < nchunks; c += kThreads) {
    t[0] += partials[3 * c];
    t[1] += partials[3 * c + 1];
    t[2] += partials[3 * c + 2];
  }
  block_sum3(t[0], t[1], t[2]);
  if (threadIdx.x == 0) epilogue(t);
}

// The two kernels of a list reduction: per-chunk partials (3 * list_chunks(numel, P) doubles),
// then the epilogue on the totals. With no element at all the totals are zeros.
template <typename Epilogue>
cudaError_t list_dots(DType dtype, const void* const* a, const void* const* b,
                      const int64_t* numel, int64_t P, double* partials, Epilogue epilogue,
                      cudaStream_t stream) {
  const void* const* lists[2] = {a, b};
  cudaError_t err = cudaSuccess;
  NK_DISPATCH_DTYPE(dtype, {
    err = for_each_list_batch<2>(lists, numel, P, [&](const ListMeta<2>& meta, int nb) {
      dots_kernel<scalar_t><<<nb, kThreads, 0, stream>>>(meta, partials);
      return cudaGetLastError();
    });
  });
  if (err != cudaSuccess) return err;
  dots_finalize_kernel<<<1, kThreads, 0, stream>>>(partials, list_chunks(numel, P), epilogue);
  return cudaGetLastError();
}

// out[p] = wa * a[p] + wb * b[p] in the math type, one rounding; wa = 1 when wa_ptr is null,
// wb = wb_sign * *wb_ptr (wb_sign is +1 or -1: exact). Each thread reads an element's inputs
// before it writes the same element, so out[p] may be a[p] or b[p] itself (no __restrict__).
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const ListMeta<3> meta,
                                                           const acc_t<T>* wa_ptr,
                                                           const acc_t<T>* wb_ptr,
                                                           acc_t<T> wb_sign) {
  using A = acc_t<T>;
  constexpr int V = kVecWidth<T>;
  const A wa = wa_ptr != nullptr ? *wa_ptr : A(1);
  const A wb = mul_rn(wb_sign, *wb_ptr);
  int slot, len;
  int64_t begin;
  block_chunk(meta, slot, begin, len);
  T* o = static_cast<T*>(meta.ptr[0][slot]) + begin;
  const T* x = static_cast<const T*>(meta.ptr[1][slot]) + begin;
  const T* y = static_cast<const T*>(meta.ptr[2][slot]) + begin;
  int i = threadIdx.x;
  if (aligned16(o) && aligned16(x) && aligned16(y)) {  // the same for the whole block
    const int nvec = len / V;
    for (int j = threadIdx.x; j < nvec; j += kThreads) {
      const int64_t off = static_cast<int64_t>(j) * V;
      const Vec<T> xv = load_vec(x + off);
      const Vec<T> yv = load_vec(y + off);
      Vec<T> ov;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        ov.v[k] = from_acc<T>(add_rn(mul_rn(wa, to_acc(xv.v[k])), mul_rn(wb, to_acc(yv.v[k]))));
      }
      store_vec(o + off, ov);
    }
    i = nvec * V + threadIdx.x;
  }
  for (; i < len; i += kThreads) {
    o[i] = from_acc<T>(add_rn(mul_rn(wa, to_acc(x[i])), mul_rn(wb, to_acc(y[i]))));
  }
}

template <typename T>
cudaError_t combine_launch(void* const* out, const void* const* a, const void* const* b,
                           const int64_t* numel, int64_t P, const void* wa, const void* wb,
                           double wb_sign, cudaStream_t stream) {
  using A = acc_t<T>;
  const void* const* lists[3] = {out, a, b};
  return for_each_list_batch<3>(lists, numel, P, [&](const ListMeta<3>& meta, int nb) {
    combine_kernel<T><<<nb, kThreads, 0, stream>>>(meta, static_cast<const A*>(wa),
                                                   static_cast<const A*>(wb),
                                                   static_cast<A>(wb_sign));
    return cudaGetLastError();
  });
}

}  // namespace
}  // namespace nk_cuda
