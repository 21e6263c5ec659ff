"""PyTorch reference of design §4: gradient inner products, the aw weight rule, the combined
gradient. Arguments arrive validated (see nats_kernels/ops/aw.py). No value is read on the host:
the five-case rule is a tree of ``torch.where``."""

from __future__ import annotations

import torch

from .._validate import acc_dtype

# Added to both squared norms before they are used (design §4, as in the official aw_loss.py).
NORM_EPS = 1e-4


def multi_dot_ref(a, b) -> torch.Tensor:
    """(<a,a>, <b,b>, <a,b>) over two lists, summed per tensor then across tensors."""
    acc = acc_dtype(a[0].dtype)
    parts = []
    for x, y in zip(a, b):
        x = x.reshape(-1).to(acc)
        y = y.reshape(-1).to(acc)
        parts.append(torch.stack((torch.dot(x, x), torch.dot(y, y), torch.dot(x, y))))
    return torch.stack(parts).sum(0)


def aw_weights_ref(dots, real_logits, fake_logits, normalized, alpha1, alpha2, delta, eps):
    # The rule runs in the accumulation dtype (float32, float64 for float64 dots) whatever the
    # dtype of dots: in float16 a sigmoid mean of 0.4999 would round to 0.5 and flip the case.
    # Hyperparameters are rounded to that dtype where they meet a tensor; the weights are
    # rounded to dots' dtype once, at the end.
    out_dtype = dots.dtype
    acc = acc_dtype(dots.dtype)
    dots = dots.to(acc)
    rr = dots[0] + NORM_EPS
    ff = dots[1] + NORM_EPS
    rf = dots[2]
    s_r = torch.sigmoid(real_logits.to(acc_dtype(real_logits.dtype))).mean().to(acc)
    s_f = torch.sigmoid(fake_logits.to(acc_dtype(fake_logits.dtype))).mean().to(acc)
    if normalized:
        inv_r = torch.rsqrt(rr)
        inv_f = torch.rsqrt(ff)
    else:
        inv_r = inv_f = torch.ones((), dtype=acc, device=dots.device)

    real_weak = (s_r < alpha1) | (s_r < s_f - delta)
    real_strong = (s_r > alpha2) & (s_r > s_f - delta)
    # rf <= 0 is the "conflicting gradients" column of the table. The official code tests
    # `rdotf <= 0`, so a NaN rf (a comparison that is false) takes the rf > 0 column: write the
    # test the same way round rather than as `rf > 0`, which differs for NaN.
    aligned = ~(rf <= 0)

    one = torch.ones((), dtype=torch.int64, device=dots.device)
    case = torch.where(
        real_weak,
        torch.where(aligned, 2 * one, one),
        torch.where(real_strong, torch.where(aligned, 4 * one, 3 * one), 5 * one),
    )
    w_r = torch.where(
        real_weak | ~real_strong,
        inv_r,
        torch.where(aligned, torch.zeros_like(rr), -rf / rr * inv_f),
    ) + eps
    w_f = torch.where(
        real_weak,
        torch.where(aligned, torch.zeros_like(ff), -rf / ff * inv_r),
        inv_f,
    ) + eps
    return w_r.to(out_dtype), w_f.to(out_dtype), case


def aw_combine_ref(out, g_r, g_f, w_r, w_f) -> None:
    """out[p] = w_r * g_r[p] + w_f * g_f[p], in place; out may be g_r or g_f themselves."""
    acc = acc_dtype(out[0].dtype)
    w_r = w_r.to(acc)
    w_f = w_f.to(acc)
    combined = [w_r * r.to(acc) + w_f * f.to(acc) for r, f in zip(g_r, g_f)]
    for o, c in zip(out, combined):
        o.copy_(c)
