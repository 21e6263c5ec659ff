// C++ CPU kernels of design §1: cfg_accumulate (stacked and list forms) and cfg_step_.
//
//   out = x0 + sum_m c[m, b] * grads[m],   c[m, b] = (weights[m] * eta) * scale[m, b]
//
// One pass over memory: each block of up to kCfgBlock elements is loaded from x0 into a small
// accumulator buffer (float32, float64 for float64), every gradient adds its block, and the
// block is written to out once. Blocks never straddle a sample (row of the batch dim), so the
// per-sample factor is one number per block. Arguments arrive validated (nats_kernels/ops/cfg.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "nk/overlap.h"
#include "nk_cpu_utils.h"

namespace nk_cpu {
namespace {

// Elements per accumulator block. Each block reads M + 1 streams and writes one; long blocks
// keep every stream sequential for many cache lines (hardware prefetch), and the float32 /
// float64 accumulator (64 / 128 KiB) stays in L2.
constexpr int64_t kCfgBlock = 16384;

// Per-(step, sample) coefficients in the math type, computed as the reference does:
// (acc(weights[m]) * acc(eta)) * acc(scale[m, b]).
template <typename A>
std::vector<A> coefficients(const at::Tensor& weights, double eta,
                            const std::optional<at::Tensor>& scale, int64_t M, int64_t B) {
  auto w = weights.reshape({M}).to(at::kDouble).contiguous();
  const double* wp = w.data_ptr<double>();
  std::vector<A> coef(static_cast<size_t>(M * B));
  at::Tensor s;
  const double* sp = nullptr;
  if (scale.has_value()) {
    s = scale->reshape({M, B}).to(at::kDouble).contiguous();
    sp = s.data_ptr<double>();
  }
  for (int64_t m = 0; m < M; ++m) {
    const A wm = static_cast<A>(wp[m]) * static_cast<A>(eta);
    for (int64_t b = 0; b < B; ++b) {
      coef[m * B + b] = sp ? wm * static_cast<A>(sp[m * B + b]) : wm;
    }
  }
  return coef;
}

// buf[j] = buf[j] + sum_m c[m * B] * grad(m)[j] for j < n, in the one order both accumulation
// loops below use (so the contiguous one stays bit-identical to the layout-aware one): four
// gradients per sweep of the accumulator (acc + c0*g0, then + c1*g1, ...: the same additions in
// the same order per element, a quarter of the accumulator traffic), then the rest one by one.
template <typename T, typename A, typename G>
inline void add_gradients(A* buf, int64_t n, const A* c, int64_t B, int64_t M, G grad) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {
    const A c0 = c[m * B], c1 = c[(m + 1) * B], c2 = c[(m + 2) * B], c3 = c[(m + 3) * B];
    const T *g0 = grad(m), *g1 = grad(m + 1), *g2 = grad(m + 2), *g3 = grad(m + 3);
    for (int64_t j = 0; j < n; ++j) {
      A v = buf[j];
      v = v + c0 * static_cast<A>(g0[j]);
      v = v + c1 * static_cast<A>(g1[j]);
      v = v + c2 * static_cast<A>(g2[j]);
      v = v + c3 * static_cast<A>(g3[j]);
      buf[j] = v;
    }
  }
  for (; m < M; ++m) {
    const A cm = c[m * B];
    const T* gm = grad(m);
    for (int64_t j = 0; j < n; ++j) buf[j] = buf[j] + cm * static_cast<A>(gm[j]);
  }
}

// out = x0 + sum_m coef[m * B + row] * grads[m]; out, x0, grads share a shape; B == 1 means no
// per-sample factor, else B == x0.size(0).
template <typename T>
void accumulate(const at::Tensor& out, const at::Tensor& x0, const std::vector<at::Tensor>& grads,
                const std::vector<acc_t<T>>& coef, int64_t B) {
  using A = acc_t<T>;
  const int64_t N = out.numel();
  if (N == 0) return;
  const int64_t M = static_cast<int64_t>(grads.size());
  std::vector<const at::Tensor*> ops;
  ops.reserve(M + 2);
  ops.push_back(&out);
  ops.push_back(&x0);
  for (const auto& g : grads) ops.push_back(&g);
  const Layout L = make_layout(ops);
  std::vector<T*> base(ops.size());
  for (size_t i = 0; i < ops.size(); ++i) base[i] = static_cast<T*>(ops[i]->data_ptr());
  const int64_t row = N / B;  // elements per sample

  auto run = [&](T* const* p, const int64_t* st, int64_t n, const A* c) {
    std::vector<A> tmp(static_cast<size_t>(std::min<int64_t>(n, kCfgBlock)));
    A* buf = tmp.data();
    T* o = p[0];
    const T* x = p[1];
    if (L.unit_inner) {
      for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<A>(x[j]);
      add_gradients<T>(buf, n, c, B, M, [&](int64_t m) -> const T* { return p[2 + m]; });
      for (int64_t j = 0; j < n; ++j) o[j] = static_cast<T>(buf[j]);
    } else {
      const int64_t sx = st[1];
      for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<A>(x[j * sx]);
      for (int64_t m = 0; m < M; ++m) {
        const A cm = c[m * B];
        const T* g = p[2 + m];
        const int64_t sg = st[2 + m];
        for (int64_t j = 0; j < n; ++j) buf[j] = buf[j] + cm * static_cast<A>(g[j * sg]);
      }
      const int64_t so = st[0];
      for (int64_t j = 0; j < n; ++j) o[j * so] = static_cast<T>(buf[j]);
    }
  };

  at::parallel_for(0, N, kChunk, [&](int64_t begin, int64_t end) {
    int64_t pos = begin;
    while (pos < end) {
      const int64_t r = pos / row;
      const int64_t seg_end = std::min(end, (r + 1) * row);
      const A* c = coef.data() + r;
      for_range<T>(L, base.data(), pos, seg_end, kCfgBlock,
                   [&](T* const* p, const int64_t* st, int64_t n) { run(p, st, n, c); });
      pos = seg_end;
    }
  });
}

// Computes into a scratch tensor when `out` overlaps an input other than by being the very
// same view (the one overlap a one-pass elementwise kernel handles), then copies.
void cfg_dispatch(const at::Tensor& x0, const std::vector<at::Tensor>& grads,
                  const at::Tensor& weights, double eta, const std::optional<at::Tensor>& scale,
                  const at::Tensor& out) {
  const int64_t M = static_cast<int64_t>(grads.size());
  const int64_t B = scale.has_value() ? x0.size(0) : 1;
  bool hazard = nk::overlap_hazard(out, x0);
  for (const auto& g : grads) hazard = hazard || nk::overlap_hazard(out, g);
  at::Tensor target = hazard ? at::empty_like(out, at::MemoryFormat::Contiguous) : out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "cfg_cpu", [&] {
    auto coef = coefficients<acc_t<scalar_t>>(weights, eta, scale, M, B);
    accumulate<scalar_t>(target, x0, grads, coef, B);
  });
  if (hazard) out.copy_(target);
}

// The coefficients coefficients() computes, read in place from any floating dtype and strides
// (no temporary tensors): (A(w_m) * A(eta)) * A(s_mb), each factor first widened to double.
template <typename A>
std::vector<A> coefficients_inplace(const at::Tensor& weights, double eta,
                                    const std::optional<at::Tensor>& scale, int64_t M,
                                    int64_t B) {
  std::vector<double> w(static_cast<size_t>(M));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights.scalar_type(), "coef_w", [&] {
    const scalar_t* p = weights.const_data_ptr<scalar_t>();
    for (int64_t m = 0; m < M; ++m) w[m] = static_cast<double>(p[m * weights.stride(0)]);
  });
  std::vector<A> coef(static_cast<size_t>(M * B));
  for (int64_t m = 0; m < M; ++m) coef[m * B] = static_cast<A>(w[m]) * static_cast<A>(eta);
  if (scale.has_value()) {
    const at::Tensor& s = *scale;  // (M, B)
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "coef_s", [&] {
      const scalar_t* p = s.const_data_ptr<scalar_t>();
      for (int64_t m = 0; m < M; ++m) {
        const A wm = coef[m * B];
        for (int64_t b = 0; b < B; ++b)
          coef[m * B + b] = wm * static_cast<A>(static_cast<double>(
              p[m * s.stride(0) + b * s.stride(1)]));
      }
    });
  }
  return coef;
}

// cfg_accumulate when out, x0 and every gradient are contiguous and out overlaps no input other
// than by being x0 itself: accumulate()'s unit-stride block loop over raw pointers, without the
// per-gradient views, the layout and the temporary coefficient tensors (what a small problem
// pays for). The same additions in the same order per element, so bit-identical to it.
template <typename T>
void accumulate_contiguous(T* out, const T* x0, const std::vector<const T*>& g, int64_t N,
                           const std::vector<acc_t<T>>& coef, int64_t B) {
  using A = acc_t<T>;
  if (N == 0) return;
  const int64_t M = static_cast<int64_t>(g.size());
  const int64_t row = N / B;
  constexpr int64_t kBlock = 2048;
  at::parallel_for(0, N, kChunk, [&](int64_t begin, int64_t end) {
    A buf[kBlock];
    int64_t pos = begin;
    while (pos < end) {
      const int64_t r = pos / row;
      const int64_t seg_end = std::min({end, (r + 1) * row, pos + kBlock});
      const int64_t n = seg_end - pos;
      const A* c = coef.data() + r;
      for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<A>(x0[pos + j]);
      add_gradients<T>(buf, n, c, B, M, [&](int64_t m) { return g[m] + pos; });
      for (int64_t j = 0; j < n; ++j) out[pos + j] = static_cast<T>(buf[j]);
      pos = seg_end;
    }
  });
}

// The contiguous path above when it applies to (out, x0, grads); false otherwise.
bool try_contiguous(const at::Tensor& x0, const std::vector<const at::Tensor*>& grads,
                    const at::Tensor& weights, double eta, const std::optional<at::Tensor>& scale,
                    const at::Tensor& out) {
  if (!out.is_contiguous() || !x0.is_contiguous()) return false;
  if (nk::overlap_hazard(out, x0)) return false;
  for (const at::Tensor* g : grads)
    if (!g->is_contiguous() || nk::overlap_hazard(out, *g)) return false;
  if (out.numel() == 0) return true;  // nothing to write (and an empty batch has no rows)
  const int64_t M = static_cast<int64_t>(grads.size());
  const int64_t B = scale.has_value() ? x0.size(0) : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "cfg_cpu_flat", [&] {
    auto coef = coefficients_inplace<acc_t<scalar_t>>(weights, eta, scale, M, B);
    std::vector<const scalar_t*> g(static_cast<size_t>(M));
    for (int64_t m = 0; m < M; ++m) g[m] = grads[m]->const_data_ptr<scalar_t>();
    accumulate_contiguous<scalar_t>(out.data_ptr<scalar_t>(), x0.const_data_ptr<scalar_t>(), g,
                                    out.numel(), coef, B);
  });
  return true;
}

void cfg_accumulate_cpu(const at::Tensor& x0, const at::Tensor& grads, const at::Tensor& weights,
                        double eta, const std::optional<at::Tensor>& scale,
                        const at::Tensor& out) {
  if (grads.is_contiguous() && out.is_contiguous() && x0.is_contiguous() &&
      !nk::overlap_hazard(out, x0) && !nk::overlap_hazard(out, grads)) {
    const int64_t M = grads.size(0);
    const int64_t N = x0.numel();
    if (N == 0) return;  // nothing to write (and an empty batch has no rows)
    const int64_t B = scale.has_value() ? x0.size(0) : 1;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "cfg_cpu_flat",
                                    [&] {
      auto coef = coefficients_inplace<acc_t<scalar_t>>(weights, eta, scale, M, B);
      const scalar_t* base = grads.const_data_ptr<scalar_t>();
      std::vector<const scalar_t*> g(static_cast<size_t>(M));
      for (int64_t m = 0; m < M; ++m) g[m] = base + m * N;
      accumulate_contiguous<scalar_t>(out.data_ptr<scalar_t>(), x0.const_data_ptr<scalar_t>(),
                                      g, N, coef, B);
    });
    return;
  }
  std::vector<at::Tensor> list;
  list.reserve(grads.size(0));
  for (int64_t m = 0; m < grads.size(0); ++m) list.push_back(grads.select(0, m));
  cfg_dispatch(x0, list, weights, eta, scale, out);
}

void cfg_accumulate_list_cpu(const at::Tensor& x0, at::TensorList grads,
                             const at::Tensor& weights, double eta,
                             const std::optional<at::Tensor>& scale, const at::Tensor& out) {
  std::vector<const at::Tensor*> ptrs;
  ptrs.reserve(grads.size());
  for (const auto& g : grads) ptrs.push_back(&g);
  if (try_contiguous(x0, ptrs, weights, eta, scale, out)) return;
  cfg_dispatch(x0, grads.vec(), weights, eta, scale, out);
}

// cfg_step_ when x and grad are contiguous and do not overlap: x[j] = x[j] + c_row * grad[j] in
// the math type, straight over memory (no accumulator block: three streams, as x.add_ moves).
// The same operations in the same order as accumulate() with M = 1, so bit-identical to it; the
// coefficients are computed as coefficients() does, without its temporary tensors.
template <typename T>
void step_contiguous(const at::Tensor& x, const at::Tensor& grad, double w, double eta,
                     const std::optional<at::Tensor>& scale) {
  using A = acc_t<T>;
  const int64_t N = x.numel();
  if (N == 0) return;
  const A wm = static_cast<A>(w) * static_cast<A>(eta);
  std::vector<A> coef(1, wm);
  at::Tensor s;
  if (scale.has_value()) {
    s = scale->to(at::kDouble).contiguous();
    const double* sp = s.const_data_ptr<double>();
    coef.resize(static_cast<size_t>(s.numel()));
    for (int64_t b = 0; b < s.numel(); ++b) coef[b] = wm * static_cast<A>(sp[b]);
  }
  const int64_t row = scale.has_value() ? N / static_cast<int64_t>(coef.size()) : N;
  T* xp = x.data_ptr<T>();
  const T* gp = grad.const_data_ptr<T>();
  at::parallel_for(0, N, kChunk, [&](int64_t begin, int64_t end) {
    int64_t pos = begin;
    while (pos < end) {
      const int64_t r = pos / row;
      const int64_t seg_end = std::min(end, (r + 1) * row);
      const A c = coef[r];
      for (int64_t j = pos; j < seg_end; ++j)
        xp[j] = static_cast<T>(static_cast<A>(xp[j]) + c * static_cast<A>(gp[j]));
      pos = seg_end;
    }
  });
}

void cfg_step_cpu(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& weight,
                  double eta, const std::optional<at::Tensor>& scale) {
  if (x.is_contiguous() && grad.is_contiguous() && !nk::overlap_hazard(x, grad)) {
    const double w = read_scalar(weight);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cfg_step_cpu",
                                    [&] { step_contiguous<scalar_t>(x, grad, w, eta, scale); });
    return;
  }
  std::optional<at::Tensor> s;
  if (scale.has_value()) s = scale->reshape({1, -1});
  cfg_dispatch(x, {grad}, weight.reshape({1}), eta, s, x);
}

}  // namespace
}  // namespace nk_cpu

TORCH_LIBRARY_IMPL(nats_kernels_ext, CPU, m) {
  m.impl("cfg_accumulate", &nk_cpu::cfg_accumulate_cpu);
  m.impl("cfg_accumulate_list", &nk_cpu::cfg_accumulate_list_cpu);
  m.impl("cfg_step_", &nk_cpu::cfg_step_cpu);
}
