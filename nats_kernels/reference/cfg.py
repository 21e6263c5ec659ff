"""PyTorch reference of design §1: annealed weights and the CFG accumulation.

Arguments arrive validated (see nats_kernels/ops/cfg.py). Math in float32, or float64 for
float64 inputs; the result is cast back to the input dtype once, at the end.
"""

from __future__ import annotations

import math
import sys

import torch

from .._validate import acc_dtype


def annealed_weights_ref(
    first: float, last: float, M: int, device=None, dtype=torch.float32
) -> torch.Tensor:
    if M == 1:
        return torch.full((1,), first, dtype=dtype, device=device)
    exponent = torch.arange(M, dtype=torch.float64, device=device) / (M - 1)
    ratio = last / first
    if math.isfinite(ratio) and ratio >= sys.float_info.min:
        w = first * ratio**exponent
    else:
        # last / first overflows or underflows float64 (e.g. first = 1e308, last = 1e-308):
        # interpolate the logarithms instead; every entry between two representable endpoints
        # is representable.
        la, lb = math.log(first), math.log(last)
        w = torch.exp(la + exponent * (lb - la))
    w[0] = first
    w[-1] = last
    return w.to(dtype)


def _coefficients(weights, eta, scale, ndim, acc):
    """eta * w_m (* s_m per sample), shaped to broadcast against one (B, ...) sample tensor."""
    coef = weights.to(acc) * eta
    if scale is None:
        return coef
    return (coef[:, None] * scale.to(acc)).reshape(scale.shape + (1,) * (ndim - 1))


def cfg_accumulate_ref(x0, grads, weights, eta, scale, out) -> None:
    """out = x0 + sum_m eta * w_m * s_m * grads[m]; grads stacked (M, ...) or a list of M."""
    acc = acc_dtype(x0.dtype)
    coef = _coefficients(weights, eta, scale, x0.dim(), acc)
    total = x0.to(acc)
    for m in range(len(grads)):
        total = total + coef[m] * grads[m].to(acc)
    out.copy_(total)


def cfg_step_ref(x, grad, weight, eta, scale) -> None:
    """x += eta * weight * scale * grad, in place."""
    acc = acc_dtype(x.dtype)
    coef = weight.to(acc) * eta
    if scale is not None:
        coef = (coef * scale.to(acc)).reshape(scale.shape + (1,) * (x.dim() - 1))
    x.copy_(x.to(acc) + coef * grad.to(acc))
