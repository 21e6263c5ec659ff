// The chunk of the multi-tensor (list) kernels, one value for the CPU and the CUDA backends.
// No torch headers: included by .cu files.
#pragma once

#include <stdint.h>

namespace nk {

// Elements per chunk of the list kernels (multi_dot, iga_ratio, aw_weights' sigmoid sums, the
// combines). The CPU cuts the flat element sequence of all positions into chunks of kChunk, the
// CUDA kernels cut each tensor (one thread block per chunk); each reduction keeps one partial per
// chunk. Fixed, so chunking depends only on the tensors' sizes, never on threads, blocks or the
// device, and every partial covers the same elements on every run.
constexpr int64_t kChunk = 32768;

}  // namespace nk
