// The aw-loss weight rule of design §4 (Zadorozhnyy et al., CVPR 2021), written once for every
// compiled backend: plain scalar math, no torch headers, usable as host and as device code.
//
// Semantics are those of nats_kernels/reference/aw.py (the oracle), which follows the official
// aw_loss.py: every comparison involving NaN is false, so
//   * a NaN s_r is neither "weak" nor "strong": case 5;
//   * a NaN rf fails `rf <= 0` and takes the rf > 0 column (case 2 or 4);
//   * NaN / Inf squared norms propagate into the weights that use them, and only those (a
//     branch that is not selected never contaminates the result).
#pragma once

#include <math.h>

#include "nk/host_device.h"

namespace nk {

// Added to both squared norms before they are used (design §4, as in the official aw_loss.py).
constexpr double kAwNormEps = 1e-4;

template <typename T>
struct AwWeights {
  T w_r;
  T w_f;
  int case_id;  // 1..5, the row/column of design §4's table
};

NK_HOST_DEVICE inline float aw_sqrt(float x) { return sqrtf(x); }
NK_HOST_DEVICE inline double aw_sqrt(double x) { return sqrt(x); }

// dot_rr = <g_r,g_r>, dot_ff = <g_f,g_f>, rf = <g_r,g_f> (the raw inner products, before the
// 1e-4 is added); s_r, s_f = mean(sigmoid(logits)). T is the math type: float or double.
template <typename T>
NK_HOST_DEVICE inline AwWeights<T> aw_rule(T dot_rr, T dot_ff, T rf, T s_r, T s_f,
                                           bool normalized, T alpha1, T alpha2, T delta,
                                           T eps) {
  const T rr = dot_rr + static_cast<T>(kAwNormEps);
  const T ff = dot_ff + static_cast<T>(kAwNormEps);
  const T one = static_cast<T>(1);
  const T zero = static_cast<T>(0);
  const T inv_r = normalized ? one / aw_sqrt(rr) : one;
  const T inv_f = normalized ? one / aw_sqrt(ff) : one;

  const bool real_weak = (s_r < alpha1) || (s_r < s_f - delta);
  const bool real_strong = (s_r > alpha2) && (s_r > s_f - delta);
  // Written as !(rf <= 0), not (rf > 0): the two differ for NaN, and the official code tests
  // `rdotf <= 0`.
  const bool aligned = !(rf <= zero);

  AwWeights<T> w;
  if (real_weak) {
    w.case_id = aligned ? 2 : 1;
    w.w_r = inv_r + eps;
    w.w_f = (aligned ? zero : (-rf / ff) * inv_r) + eps;
  } else if (real_strong) {
    w.case_id = aligned ? 4 : 3;
    w.w_r = (aligned ? zero : (-rf / rr) * inv_f) + eps;
    w.w_f = inv_f + eps;
  } else {
    w.case_id = 5;
    w.w_r = inv_r + eps;
    w.w_f = inv_f + eps;
  }
  return w;
}

}  // namespace nk
