"""The float64 oracle of design §4's weight rule, and logits with a chosen sigmoid mean: shared by
the aw op tests (test_aw_weights.py, test_aw_step.py). The oracle upcasts the same, already
rounded inputs to float64; nothing here calls the library's reference functions."""

from __future__ import annotations

import math

import torch
from helpers import assert_close, make

NORM_EPS = 1e-4  # design §4: added to both squared norms, as in the official aw_loss.py


def oracle_rule(dots, s_r, s_f, normalized=True, alpha1=0.5, alpha2=0.75, delta=0.05, eps=0.05):
    """design §4's table, transcribed in plain Python float64, with the official code's
    comparisons (anything compared with NaN is false). Returns (w_r, w_f, case)."""
    rr = dots[0] + NORM_EPS
    ff = dots[1] + NORM_EPS
    rf = dots[2]
    r_norm = math.sqrt(rr)
    f_norm = math.sqrt(ff)
    if s_r < alpha1 or s_r < s_f - delta:
        if rf <= 0:
            if normalized:
                return 1 / r_norm + eps, -rf / (ff * r_norm) + eps, 1
            return 1 + eps, -rf / ff + eps, 1
        if normalized:
            return 1 / r_norm + eps, eps, 2
        return 1 + eps, eps, 2
    if s_r > alpha2 and s_r > s_f - delta:
        if rf <= 0:
            if normalized:
                return -rf / (rr * f_norm) + eps, 1 / f_norm + eps, 3
            return -rf / rr + eps, 1 + eps, 3
        if normalized:
            return eps, 1 / f_norm + eps, 4
        return eps, 1 + eps, 4
    if normalized:
        return 1 / r_norm + eps, 1 / f_norm + eps, 5
    return 1 + eps, 1 + eps, 5


def score(logits) -> float:
    """mean(sigmoid(logits)) in float64, from the logits as they are (already rounded)."""
    return float(torch.sigmoid(logits.double()).mean())


def check_weights(result, dots, real_logits, fake_logits, **kw):
    """Compare aw_weights' result with the oracle table; return the oracle case."""
    w_r, w_f, case = result
    d = [float(x) for x in dots.double()]
    e_r, e_f, e_case = oracle_rule(d, score(real_logits), score(fake_logits), **kw)
    for name, w in (("w_r", w_r), ("w_f", w_f), ("case", case)):
        assert isinstance(w, torch.Tensor) and w.shape == (), f"{name}: {w!r}"
        assert w.device == dots.device, name
    assert case.dtype == torch.int64
    assert int(case) == e_case, f"case {int(case)}, expected {e_case}"
    assert_close(w_r, torch.tensor(e_r, dtype=torch.float64), dots.dtype, f"w_r case {e_case}")
    assert_close(w_f, torch.tensor(e_f, dtype=torch.float64), dots.dtype, f"w_f case {e_case}")
    return e_case


def logits_for(s, shape=(16,), dtype=torch.float32, device="cpu", seed=0, spread=0.3):
    """Logits whose sigmoid mean is close to ``s``: logit(s) plus zero-mean noise."""
    noise = make(shape, torch.float64, seed=seed) * spread
    if noise.numel() > 1:
        noise = noise - noise.mean()
    else:
        noise = noise * 0
    return (math.log(s / (1 - s)) + noise).to(dtype).to(device)
