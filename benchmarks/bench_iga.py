"""The BRC / IGA correction (design §5): r = iga_ratio(df/dθ_D, dF/dθ_D); g_G -= r * df/dθ_G.

Gradient lists shaped like the discriminator (for r) and generator (for the correction) of
SN-GAN (CIFAR-10: D ~1.05M, G ~4.3M parameters), DCGAN (64x64: D ~2.8M, G ~3.6M) and BigGAN
(128x128, ch=64: D ~39M, G ~32M), generated; fp32, dF/dθ_D correlated with df/dθ_D so r is
about -0.8. The correction updates g_G in place (every provider alike). Bytes the task needs:
(2 * P_D + 3 * P_G) * 4.

Providers (the baseline first):
- ``per_tensor_item``: per-tensor ``torch.dot(...).item()`` for numerator and denominator
  (2 host syncs per discriminator tensor), r in Python, then per-tensor ``t.sub_(r * f)``;
- ``reference`` / ``cpu`` (/ ``auto``): ``nk.iga_correction_(g_G, gf_G, nk.iga_ratio(gf_D, gF_D))``;
- ``foreach``: no host sync: per-tensor ``torch.vdot`` stacked and summed on device for the
  numerator, ``torch._foreach_norm`` for the denominator, then
  ``torch._foreach_sub_(g_G, torch._foreach_mul(gf_G, r))`` (a partial equivalent: one
  temporary list).
"""

from __future__ import annotations

import gan_shapes
import nkbench
import pytest
import torch

import nats_kernels as nk

OPS = ["iga_ratio", "iga_correction_"]
OP = "iga step"
BASELINE = "per_tensor_item"
# fp32 sums over up to 39M elements: measured against float64 at BigGAN size, r from the
# baseline's BLAS torch.dot is off by 6e-5 and the foreach version's (torch._foreach_norm
# squared) by 4.5e-4 (nats_kernels' iga_ratio: 2e-8), hence 1e-3 here; rel err is recorded.
TOL = 1e-3
IGA_EPS = 1e-12

FAMILIES = gan_shapes.gan_families(nkbench.smoke(), nkbench.ON_GPU)
SIZES = [(label, (d_shapes, g_shapes)) for label, d_shapes, g_shapes in FAMILIES]
PROVIDERS = [BASELINE, *nkbench.kernel_providers(OPS), "foreach"]
_cache = nkbench.SizeCache()


def _inputs(shapes) -> dict:
    d_shapes, g_shapes = shapes
    gen = nkbench.generator(0)
    gf_D = nkbench.randn_list(d_shapes, gen, 1e-2)
    gF_D = [-0.8 * f + nkbench.randn(f.shape, gen, 1e-2) for f in gf_D]
    g_G = nkbench.randn_list(g_shapes, gen, 1e-2)
    gf_G = nkbench.randn_list(g_shapes, gen, 1e-2)
    return {"gf_D": gf_D, "gF_D": gF_D, "g_G": g_G, "gf_G": gf_G}


def _provider_fn(provider: str, d: dict, g_G: list):
    gf_D, gF_D, gf_G = d["gf_D"], d["gF_D"], d["gf_G"]
    if provider == "per_tensor_item":
        def run():
            num = sum(torch.dot(f.view(-1), F.view(-1)).item() for f, F in zip(gf_D, gF_D))
            den = sum(torch.dot(f.view(-1), f.view(-1)).item() for f in gf_D) + IGA_EPS
            r = num / den
            for t, f in zip(g_G, gf_G):
                t.sub_(r * f)
            return g_G
    elif provider == "foreach":
        def run():
            num = torch.stack([torch.vdot(f.view(-1), F.view(-1))
                               for f, F in zip(gf_D, gF_D)]).sum()
            den = torch.stack(torch._foreach_norm(gf_D)).square().sum()
            r = num / (den + IGA_EPS)
            torch._foreach_sub_(g_G, torch._foreach_mul(gf_G, r))
            return g_G
    else:
        def run():
            nk.iga_correction_(g_G, gf_G, nk.iga_ratio(gf_D, gF_D, eps=IGA_EPS))
            return g_G
    return run


@pytest.mark.parametrize(("label", "shapes", "provider"), nkbench.cases(SIZES, PROVIDERS))
def test_iga_step(benchmark, use_provider, label, shapes, provider):
    use_provider(provider)
    d = _cache.get(label, lambda: _inputs(shapes))
    p_d, p_g = gan_shapes.numel(shapes[0]), gan_shapes.numel(shapes[1])
    roof = nkbench.roofline((2 * p_d + 3 * p_g) * 4, 4 * p_d + 2 * p_g)

    def fresh(name):   # the untimed agreement calls each correct their own copy of g_G
        return _provider_fn(name, d, [t.clone() for t in d["g_G"]])

    nkbench.check_and_record(
        benchmark, op=OP, label=label, provider=provider, baseline=BASELINE, run=fresh(provider),
        baseline_run=fresh(BASELINE), cache=d, tol=TOL, roof=roof,
        params_D=p_d, params_G=p_g, tensors_D=len(shapes[0]), tensors_G=len(shapes[1]),
        dtype="float32")
    benchmark(nkbench.timed(_provider_fn(provider, d, [t.clone() for t in d["g_G"]])))
