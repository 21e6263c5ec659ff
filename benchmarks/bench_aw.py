"""One aw-loss step (design §4): multi_dot + aw_weights + aw_combine_ on the gradients of a D.

Gradient lists are shaped like the parameters of three discriminators (generated, no download):
SN-GAN ResNet (CIFAR-10, ~1.05M parameters), DCGAN (64x64, ~2.8M) and BigGAN (128x128, ch=64,
~39M); fp32, g_f correlated with g_r (rf < 0) and real logits giving s_r < alpha1, so the step
takes case 1, the one with most arithmetic. The combined gradient goes to a preallocated list
(the parameters' ``.grad``). Bytes the task needs: 5 * P * 4 (read both lists for the three
inner products, read them again and write the result).

Providers (the baseline first):
- ``official``: the official ``aw_loss.py`` procedure from the two gradient lists: clone both
  lists (``param.grad.clone()`` after each backward), ``torch.cat`` each, three
  ``torch.dot(...).item()``, the two sigmoid means with ``.item()``, the rule in Python, and the
  per-parameter write-back ``grad = w_r * g_r + w_f * g_f`` (new tensors);
- ``reference`` / ``cpu`` (/ ``auto``): ``multi_dot``, ``aw_weights``, ``aw_combine_(out, ...)``;
- ``foreach``: what a careful user writes without the library: no copies and no host sync;
  ``torch._foreach_norm`` for <g,g>, per-tensor ``torch.vdot`` for <g_r,g_f>, the rule with
  ``torch.where`` on device, and ``torch._foreach_copy_/_foreach_mul_/_foreach_add_`` for the
  combination (a partial equivalent: one temporary list, several passes).
"""

from __future__ import annotations

import math

import gan_shapes
import nkbench
import pytest
import torch

import nats_kernels as nk

OPS = ["multi_dot", "aw_weights", "aw_combine_"]
OP = "aw step"
BASELINE = "official"
TOL = 1e-4
A1, A2, DELTA, EPS = 0.5, 0.75, 0.05, 0.05

FAMILIES = gan_shapes.gan_families(nkbench.smoke(), nkbench.ON_GPU)
SIZES = [(label, d_shapes) for label, d_shapes, _ in FAMILIES]
PROVIDERS = [BASELINE, *nkbench.kernel_providers(OPS), "foreach"]
_cache = nkbench.SizeCache()


def _inputs(shapes) -> dict:
    gen = nkbench.generator(0)
    g_r = nkbench.randn_list(shapes, gen, 1e-2)
    g_f = [-0.3 * r + nkbench.randn(r.shape, gen, 1e-2) for r in g_r]
    real_logits = nkbench.randn(64, gen) - 1.0
    fake_logits = nkbench.randn(64, gen) - 2.0
    return {"g_r": g_r, "g_f": g_f, "real": real_logits, "fake": fake_logits}


def _rule(rr, ff, rf, s_r, s_f):
    """design §4 normalized rule in Python (the official code's if/else)."""
    r_norm, f_norm = math.sqrt(rr), math.sqrt(ff)
    if s_r < A1 or s_r < s_f - DELTA:
        return 1 / r_norm + EPS, (-rf / (ff * r_norm) if rf <= 0 else 0.0) + EPS
    if s_r > A2 and s_r > s_f - DELTA:
        return (-rf / (rr * f_norm) if rf <= 0 else 0.0) + EPS, 1 / f_norm + EPS
    return 1 / r_norm + EPS, 1 / f_norm + EPS


def _provider_fn(provider: str, d: dict, out: list):
    g_r, g_f, real, fake = d["g_r"], d["g_f"], d["real"], d["fake"]
    if provider == "official":
        def run():
            real_t = [g.clone() for g in g_r]
            real_list = torch.cat([g.reshape(-1) for g in real_t])
            fake_t = [g.clone() for g in g_f]
            fake_list = torch.cat([g.reshape(-1) for g in fake_t])
            rr = torch.dot(real_list, real_list).item() + 1e-4
            ff = torch.dot(fake_list, fake_list).item() + 1e-4
            rf = torch.dot(real_list, fake_list).item()
            s_r = torch.sigmoid(real).mean().item()
            s_f = torch.sigmoid(fake).mean().item()
            w_r, w_f = _rule(rr, ff, rf, s_r, s_f)
            return [w_r * a + w_f * b for a, b in zip(real_t, fake_t)]
    elif provider == "foreach":
        def run():
            rr = torch.stack(torch._foreach_norm(g_r)).square().sum() + 1e-4
            ff = torch.stack(torch._foreach_norm(g_f)).square().sum() + 1e-4
            rf = torch.stack([torch.vdot(a.view(-1), b.view(-1)) for a, b in zip(g_r, g_f)]).sum()
            s_r, s_f = torch.sigmoid(real).mean(), torch.sigmoid(fake).mean()
            r_norm, f_norm = rr.sqrt(), ff.sqrt()
            zero = rf.new_zeros(())
            c12 = (s_r < A1) | (s_r < s_f - DELTA)
            c34 = (s_r > A2) & (s_r > s_f - DELTA)
            neg = rf <= 0
            w_r = torch.where(c12, 1 / r_norm, torch.where(
                c34, torch.where(neg, -rf / (rr * f_norm), zero), 1 / r_norm)) + EPS
            w_f = torch.where(c12, torch.where(neg, -rf / (ff * r_norm), zero), 1 / f_norm) + EPS
            torch._foreach_copy_(out, g_r)
            torch._foreach_mul_(out, w_r)
            torch._foreach_add_(out, torch._foreach_mul(g_f, w_f))
            return out
    else:
        def run():
            w_r, w_f, _ = nk.aw_weights(nk.multi_dot(g_r, g_f), real, fake,
                                        alpha1=A1, alpha2=A2, delta=DELTA, eps=EPS)
            nk.aw_combine_(out, g_r, g_f, w_r, w_f)
            return out
    return run


@pytest.mark.parametrize(("label", "shapes", "provider"), nkbench.cases(SIZES, PROVIDERS))
def test_aw_step(benchmark, use_provider, label, shapes, provider):
    use_provider(provider)
    d = _cache.get(label, lambda: _inputs(shapes))
    out = [torch.empty_like(g) for g in d["g_r"]]
    run = _provider_fn(provider, d, out)
    p = gan_shapes.numel(shapes)
    roof = nkbench.roofline(5 * p * 4, 9 * p)
    nkbench.check_and_record(
        benchmark, op=OP, label=label, provider=provider, baseline=BASELINE, run=run,
        baseline_run=_provider_fn(BASELINE, d, None), cache=d, tol=TOL, roof=roof,
        params=p, tensors=len(shapes), dtype="float32")
    benchmark(nkbench.timed(run))
