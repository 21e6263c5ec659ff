"""cfg_accumulate (design §1): all M = 15 functional-gradient steps of annealed CFG on a batch.

Sizes: samples 64x3x64x64 and 64x3x256x256 (the paper's resolutions) and a flat 8M-element
fp32 tensor; grads stacked as ``(M, *x0.shape)``, NATS weights ``annealed_weights(1, 0.01, 15)``,
eta 0.5, no per-sample scale. Bytes the task needs: ``(M + 2) * numel * itemsize`` (read x0 and
M gradients, write the result).

Providers (the baseline first):
- ``official_loop``: the official code's update, ``x.data += eta * w_m * g_m`` per step with
  Python floats (``eta * w_m`` is one number; then a temporary ``(eta*w_m) * g_m`` and an add:
  about 5 * M * numel * itemsize bytes), starting from a copy of x0 in a preallocated buffer;
- ``reference`` / ``cpu`` (/ ``auto``): ``nk.cfg_accumulate(x0, grads, w, eta=eta, out=out)``;
- ``add_alpha_loop``: ``x.add_(g_m, alpha=eta * w_m)`` per step (torch.add's fused axpy, 3 passes
  per step, no temporary);
- ``addmv``: ``torch.addmv(x0, grads.view(M, -1).t(), w, alpha=eta)``, the one-call BLAS
  matrix-vector form (one pass over the gradients, like the fused op; it needs the gradients
  stacked in one tensor and has no per-sample scale).
``torch._foreach_add_`` has nothing to add here: there is one sample tensor, not a list.
"""

from __future__ import annotations

import nkbench
import pytest
import torch

import nats_kernels as nk

OP = "cfg_accumulate"
M = 15
ETA = 0.5
BASELINE = "official_loop"
TOL = 1e-5

if nkbench.smoke():
    SIZES = [("4x3x8x8", (4, 3, 8, 8)), ("4096", (4096,))]
else:
    SIZES = [("64x3x64x64", (64, 3, 64, 64)), ("64x3x256x256", (64, 3, 256, 256)),
             ("8M", (8 * 2**20,))]
    if nkbench.ON_GPU:  # issue 4's GPU target: 100M+ elements (x0 and 15 gradients: 8.6 GB)
        SIZES.append(("128M", (128 * 2**20,)))
PROVIDERS = [BASELINE, *nkbench.kernel_providers([OP]), "add_alpha_loop", "addmv"]
_cache = nkbench.SizeCache()


def _inputs(shape) -> dict:
    gen = nkbench.generator(0)
    x0 = nkbench.uniform(shape, gen)
    grads = nkbench.uniform((M, *shape), gen)
    w = nk.annealed_weights(1.0, 0.01, M, device=nkbench.DEVICE)
    return {"x0": x0, "grads": grads, "w": w, "w_list": w.tolist()}


def _provider_fn(provider: str, d: dict, out: torch.Tensor):
    x0, grads, w, wl = d["x0"], d["grads"], d["w"], d["w_list"]
    if provider == "official_loop":
        def run():
            x = out.copy_(x0)
            for m in range(M):
                x.data += ETA * wl[m] * grads[m]
            return x
    elif provider == "add_alpha_loop":
        def run():
            x = out.copy_(x0)
            for m in range(M):
                x.add_(grads[m], alpha=ETA * wl[m])
            return x
    elif provider == "addmv":
        flat = grads.view(M, -1).t()

        def run():
            torch.addmv(x0.view(-1), flat, w, alpha=ETA, out=out.view(-1))
            return out
    else:
        def run():
            return nk.cfg_accumulate(x0, grads, w, eta=ETA, out=out)
    return run


@pytest.mark.parametrize(("label", "shape", "provider"), nkbench.cases(SIZES, PROVIDERS))
def test_cfg_accumulate(benchmark, use_provider, label, shape, provider):
    use_provider(provider)
    d = _cache.get(label, lambda: _inputs(shape))
    out = torch.empty_like(d["x0"])
    run = _provider_fn(provider, d, out)
    n = d["x0"].numel()
    itemsize = d["x0"].element_size()
    roof = nkbench.roofline((M + 2) * n * itemsize, 2 * M * n)
    nkbench.check_and_record(
        benchmark, op=OP, label=label, provider=provider, baseline=BASELINE, run=run,
        baseline_run=_provider_fn(BASELINE, d, torch.empty_like(out)), cache=d, tol=TOL,
        roof=roof, M=M, numel=n, dtype="float32")
    benchmark(nkbench.timed(run))
