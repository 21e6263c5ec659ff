// NK_HOST_DEVICE: the qualifier of the scalar code in csrc/include/nk/ that both backends run,
// as host code (g++, and nvcc's host pass) and as device code (nvcc). No torch headers here or in
// any nk/ header a .cu file includes (.ci/nvcc_check compiles the .cu files without torch).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define NK_HOST_DEVICE __host__ __device__
#else
#define NK_HOST_DEVICE
#endif
