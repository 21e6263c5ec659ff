// The memory-overlap tests of the in-place kernels, for the CPU kernels (csrc/cpu) and the CUDA
// binding (csrc/cuda/*_binding.cpp) alike: an output may be the very same view as an input; any
// other overlap of an input with an output makes that input read from a private copy (or, in the
// CUDA binding, the output computed into scratch memory). ATen only: never included by a .cu file.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <unordered_map>
#include <vector>

namespace nk {

// Byte range [lo, hi) spanned by a tensor's elements.
inline void byte_span(const at::Tensor& t, uintptr_t& lo, uintptr_t& hi) {
  auto base = reinterpret_cast<uintptr_t>(t.data_ptr());
  int64_t neg = 0, pos = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t ext = (t.size(d) - 1) * t.stride(d);
    (ext < 0 ? neg : pos) += ext;
  }
  const int64_t item = t.element_size();
  lo = base + neg * item;
  hi = base + (pos + 1) * item;
}

// True when writing `out` element by element while reading `in` at the same logical index
// could read a value already overwritten: the memory overlaps and the two are not the very same
// view (same address, same strides), which is the one harmless overlap of an elementwise kernel.
inline bool overlap_hazard(const at::Tensor& out, const at::Tensor& in) {
  if (out.numel() == 0 || in.numel() == 0) return false;
  if (!out.storage().is_alias_of(in.storage())) return false;
  if (out.data_ptr() == in.data_ptr() && out.sizes() == in.sizes() &&
      out.strides() == in.strides()) {
    return false;
  }
  uintptr_t olo, ohi, ilo, ihi;
  byte_span(out, olo, ohi);
  byte_span(in, ilo, ihi);
  return olo < ihi && ilo < ohi;
}

// Positions q of `in` whose memory an in-place list kernel writing `out` could overwrite before
// reading it: any overlap with out[p], p != q, or a non-identical overlap with out[q]. Callers
// give those inputs a private copy first (rare: aliasing other than out[p] is in[p] itself).
inline std::vector<bool> list_hazards(at::TensorList out, at::TensorList in) {
  if (out.size() * in.size() <= 1024) {  // short lists: every pair, nothing allocated but hazard
    std::vector<bool> hazard(in.size(), false);
    for (size_t q = 0; q < in.size(); ++q) {
      if (in[q].numel() == 0) continue;
      uintptr_t lo = 0, hi = 0;
      byte_span(in[q], lo, hi);
      const void* storage = in[q].storage().data();
      for (size_t p = 0; p < out.size() && !hazard[q]; ++p) {
        if (out[p].numel() == 0 || out[p].storage().data() != storage) continue;
        uintptr_t olo = 0, ohi = 0;
        byte_span(out[p], olo, ohi);
        if (olo < hi && lo < ohi) hazard[q] = p != q || overlap_hazard(out[p], in[q]);
      }
    }
    return hazard;
  }
  struct Span {
    uintptr_t lo, hi;
    size_t p;
  };
  std::unordered_map<const void*, std::vector<Span>> by_storage;
  for (size_t p = 0; p < out.size(); ++p) {
    if (out[p].numel() == 0) continue;
    Span s{0, 0, p};
    byte_span(out[p], s.lo, s.hi);
    by_storage[out[p].storage().data()].push_back(s);
  }
  // Per storage: spans sorted by lo, with the running maximum of hi for an early stop.
  std::unordered_map<const void*, std::vector<uintptr_t>> max_hi;
  for (auto& kv : by_storage) {
    auto& v = kv.second;
    std::sort(v.begin(), v.end(), [](const Span& a, const Span& b) { return a.lo < b.lo; });
    auto& m = max_hi[kv.first];
    m.resize(v.size());
    uintptr_t run = 0;
    for (size_t k = 0; k < v.size(); ++k) m[k] = run = std::max(run, v[k].hi);
  }
  std::vector<bool> hazard(in.size(), false);
  for (size_t q = 0; q < in.size(); ++q) {
    if (in[q].numel() == 0) continue;
    auto it = by_storage.find(in[q].storage().data());
    if (it == by_storage.end()) continue;
    const auto& v = it->second;
    const auto& m = max_hi[it->first];
    uintptr_t lo, hi;
    byte_span(in[q], lo, hi);
    // Spans with s.lo < hi, walked down while some earlier span may still reach past lo.
    size_t k = std::lower_bound(v.begin(), v.end(), hi,
                                [](const Span& s, uintptr_t x) { return s.lo < x; }) -
               v.begin();
    while (k > 0 && m[k - 1] > lo && !hazard[q]) {
      --k;
      const Span& s = v[k];
      if (s.hi <= lo) continue;
      hazard[q] = s.p != q || overlap_hazard(out[s.p], in[q]);
    }
  }
  return hazard;
}

// `in` with a private copy of each input that list_hazards flags.
inline std::vector<at::Tensor> safe_inputs(at::TensorList out, at::TensorList in) {
  std::vector<at::Tensor> res = in.vec();
  const auto hazard = list_hazards(out, in);
  for (size_t q = 0; q < res.size(); ++q) {
    if (hazard[q]) res[q] = res[q].clone();
  }
  return res;
}

}  // namespace nk
