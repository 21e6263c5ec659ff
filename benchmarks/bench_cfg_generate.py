"""AnnealedCFG.generate on a GPU, eager and with ``cuda_graph=True`` (design §1.4), against the
port of the official loop's ``DDG.generate`` in ``cfg_stage.py`` (issue 13, item 4: the graph
option's target is 3x the eager official loop).

GPU only (``NK_BENCH_DEVICE=cuda``; ``.ci/gpu_check`` runs it): on the CPU the module is skipped,
unless ``NK_BENCH_CFG_GENERATE=1`` (tests/test_bench_cfg_stage.py runs it so, without the graph
provider, to check the file itself).

Sizes: ``cfg_stage.py``'s two models (3-layer LeakyReLU MLPs: ``toy``, 2-d data, width 256;
``784``, 784-d data, width 1024, z_dim 100) with the paper's settings: N = 640 samples in batches
of 64 through M = 15 snapshots, NATS weights ``annealed_weights(1, 0.01, 15)``, eta 0.5;
``NK_BENCH_SIZES=smoke``: M = 3, N = 40 in batches of 16 (a partial last batch). Each provider
starts from the same G and D and reseeds its generator before each call, so all draw the same z.

Providers (the baseline first):
- ``official_port``: ``OfficialCFG.generate`` (``fake.data += eta * w_m * fake.grad.data`` after
  ``d_out.backward(ones_like(d_out))`` per step; each batch copied to a host buffer, as the
  official code does);
- ``generate``: ``AnnealedCFG.generate`` (eager: per step one ``autograd.grad`` and one fused
  ``cfg_step_``; samples stay on the device);
- ``generate_graph``: the same with ``cuda_graph=True`` (one CUDA-graph replay per batch; the
  graphs of the two batch layouts are captured before timing).
"""

from __future__ import annotations

import os

import cfg_stage  # benchmarks/ (the official port)
import nkbench
import pytest
import torch

import nats_kernels as nk
from nats_kernels.schemes import AnnealedCFG

OP = "cfg generate"
BASELINE = "official_port"
TOL = 1e-4  # the port rounds twice per step (a temporary, then the add), cfg_step_ once
CPU_ENV = "NK_BENCH_CFG_GENERATE"

if not nkbench.ON_GPU and os.environ.get(CPU_ENV) != "1":
    pytest.skip(f"GPU benchmark (NK_BENCH_DEVICE=cuda; {CPU_ENV}=1 runs it on the CPU)",
                allow_module_level=True)

if nkbench.smoke():
    SETTINGS = dict(M=3, N=40, batch_size=16)
else:
    SETTINGS = dict(M=15, N=640, batch_size=64)
SIZES = [(f"{model} M{SETTINGS['M']} N{SETTINGS['N']}/{SETTINGS['batch_size']}", model)
         for model in ("toy", "784")]
PROVIDERS = [BASELINE, "generate", *(["generate_graph"] if nkbench.ON_GPU else [])]
_cache = nkbench.SizeCache()


def _models(model: str):
    dim, width, z_dim = cfg_stage.MODELS[model]
    torch.manual_seed(0)
    G, D = cfg_stage.mlp(z_dim, dim, width), cfg_stage.mlp(dim, 1, width)
    return G.to(nkbench.DEVICE), D.to(nkbench.DEVICE), z_dim


def _make(model: str, provider: str):
    """The provider's object and its untimed and timed ``generate`` calls."""
    G, D, z_dim = _models(model)
    M, N, bs = SETTINGS["M"], SETTINGS["N"], SETTINGS["batch_size"]
    w = nk.annealed_weights(1.0, 0.01, M)
    rng = torch.Generator(nkbench.DEVICE)
    if provider == BASELINE:
        obj = cfg_stage.OfficialCFG(G, D, M=M, eta=cfg_stage.ETA, weights=w.tolist(), U=1, N=N,
                                    x_epochs=1, lr=cfg_stage.LR, batch_size=bs, z_dim=z_dim,
                                    rng=rng)

        def run():
            rng.manual_seed(5)
            return obj.generate(N, batch_size=bs)
    else:
        obj = AnnealedCFG(G, D, M=M, eta=cfg_stage.ETA, weights=w, N=N, batch_size=bs,
                          z_dim=z_dim, rng=rng, cuda_graph=provider == "generate_graph")

        def run():
            rng.manual_seed(5)
            return obj.generate(N, batch_size=bs)
    return obj, run


def _on_device(run):
    return lambda: run().to(nkbench.DEVICE)


@pytest.mark.parametrize(("label", "model", "provider"), nkbench.cases(SIZES, PROVIDERS))
def test_cfg_generate(benchmark, label, model, provider):
    M, N, bs = SETTINGS["M"], SETTINGS["N"], SETTINGS["batch_size"]
    d = _cache.get(label, dict)
    obj, run = _make(model, provider)
    run()  # warm-up; with the graph option: captures the full and the last batch's layouts
    dim, width, z_dim = cfg_stage.MODELS[model]
    params = dim * width + width * width + width + 2 * width + 1  # one snapshot's weights
    batches = -(-N // bs)
    # Per step, each batch reads the snapshot's weights twice (forward, input gradient) and
    # does ~4 FLOPs per weight and sample; samples are read and written once per step.
    nbytes = 4 * M * (2 * batches * params + 2 * N * dim)
    roof = nkbench.roofline(nbytes, 4 * M * N * params, gemm_shape=(bs, width, width))
    baseline_run = None if provider == BASELINE else _on_device(_make(model, BASELINE)[1])
    nkbench.check_and_record(
        benchmark, op=OP, label=label, provider=provider, baseline=BASELINE,
        run=_on_device(run), baseline_run=baseline_run, cache=d, tol=TOL, roof=roof,
        M=M, N=N, batch_size=bs, model=model, dtype="float32",
        graph_captures=obj._graphs.captures if getattr(obj, "_graphs", None) else None)
    benchmark(nkbench.timed(run))
