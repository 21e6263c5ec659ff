"""median_pairwise_distance (design §3, NATS Technique 1): the median of the N(N-1)/2 distances.

Grid: the two target sizes of issue 3 (N = 4096, d = 1024; N = 32768, d = 3072, run once per
provider and without the reference), then N in {2048, 8192, 20000} x d in {2, 3072, 12288}
(d = 3072 is a flattened 3x32x32 image, 12288 a 3x64x64 one), and batches B = 64 of N = 256 for
each d; float32 unit normals.

``NK_BENCH_SIZES=full`` (the default) leaves out the two combinations that take many minutes per
call on a 2-core CPU (``SKIP_IN_FULL``): N = 20000 with d = 3072 (about 2.5 TFLOP for cdist's
full matrix, 1.6 GB of distances; measured here ~20 s for cdist alone and several recomputing
passes for the reference, whose 256 MiB budget cannot hold 2e8 distances) and N = 20000 with
d = 12288 (4x that). ``NK_BENCH_SIZES=all`` runs them too.

Each call is long, so the timing uses ``benchmark.pedantic`` with ``NK_BENCH_MEDIAN_ROUNDS``
rounds (default 3; 1 under ``smoke``) and no warm-up beyond the untimed agreement call, which
also records the call's peak extra resident memory (``peak_extra_bytes``; every provider is
warmed up once on a tiny input at the start, so one-time initialization is not counted).

Providers (the baseline first):
- ``cdist_median``: ``torch.cdist(x, x)``, then ``torch.median`` of the upper triangle selected
  with a boolean ``triu`` mask (materializes the N x N matrix, the mask and the N(N-1)/2
  selected values); for a batch, a Python loop of that over the B sets;
- ``reference`` / ``cpu`` (/ ``auto``): ``nk.median_pairwise_distance(x)`` (``batched=True``
  for a batch).
FLOPs of the task: 2 * d per distinct pair (N(N-1)/2 pairs per set); roofline against the
measured rate of a float32 ``(n, d) @ (d, n)`` mm, n = min(N, 2048).
"""

from __future__ import annotations

import os

import nkbench
import pytest
import torch

import nats_kernels as nk

OP = "median_pairwise_distance"
BASELINE = "cdist_median"
TOL = 1e-4

NS, DS = (2048, 8192, 20000), (2, 3072, 12288)
BATCH = (64, 256)
SKIP_IN_FULL = {(20000, 3072), (20000, 12288)}
# The two targets: N = 4096, d = 1024 (>= 1.5x faster than cdist + median with at most a
# quarter of its peak extra memory), and N = 32768, d = 3072 (exact, < 1 GiB extra; cdist needs
# > 4 GiB). The latter runs once per provider, without the reference (two recomputing passes of
# 5.4e8 keys in Python take tens of minutes).
TARGETS = [("N4096 d1024", (0, 4096, 1024)), ("N32768 d3072", (0, 32768, 3072))]
HUGE = {"N32768 d3072"}


# Issue 4's GPU target: N = 50000, d = 3072 (1.25e9 pairs) exact within 2x of the time of one
# float32 GEMM of the same size, (N, d) @ (d, N) (measured in the run: ``gemm_same_size_s``).
GPU_TARGET = ("N50000 d3072", (0, 50000, 3072))


def _grid() -> list[tuple[str, tuple[int, int, int]]]:
    """``(label, (B, N, d))``; B = 0 means an unbatched ``(N, d)`` input."""
    mode = nkbench.size_mode()
    if mode == "smoke":
        return [("N64 d3", (0, 64, 3)), ("N100 d7", (0, 100, 7)), ("B4xN16 d5", (4, 16, 5))]
    if nkbench.ON_GPU:
        return [TARGETS[0], GPU_TARGET, ("N20000 d2", (0, 20000, 2)),
                (f"B{BATCH[0]}xN{BATCH[1]} d3072", (BATCH[0], BATCH[1], 3072))]
    sizes = [(f"N{n} d{d}", (0, n, d)) for n in NS for d in DS
             if mode == "all" or (n, d) not in SKIP_IN_FULL]
    return TARGETS + sizes + [
        (f"B{BATCH[0]}xN{BATCH[1]} d{d}", (BATCH[0], BATCH[1], d)) for d in DS]


def skipped() -> list[str]:
    """Sizes of the grid this run leaves out (conftest copies them into the JSON)."""
    mode = nkbench.size_mode()
    if mode == "smoke":
        return []
    if nkbench.ON_GPU:
        return [f"{OP}: on a GPU only N4096 d1024, N50000 d3072, N20000 d2 and the batch of 64 "
                "x N256 d3072 run (the CPU grid's other sizes take seconds there)"]
    left = [f"{OP} N32768 d3072 with the reference provider (tens of minutes in Python)"]
    if mode == "full":
        left += [f"{OP} N{n} d{d} (NK_BENCH_SIZES=all runs it)" for n, d in sorted(SKIP_IN_FULL)]
    return left


SIZES = _grid()
PROVIDERS = [BASELINE, *nkbench.kernel_providers([OP])]
ROUNDS = 1 if nkbench.smoke() else int(os.environ.get("NK_BENCH_MEDIAN_ROUNDS", "3"))
CASES = [c for c in nkbench.cases(SIZES, PROVIDERS)
         if not (c.values[0] in HUGE and c.values[2] == "reference")]
_cache = nkbench.SizeCache()


def _cdist_median(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    dist = torch.cdist(x, x)
    mask = torch.ones(n, n, dtype=torch.bool, device=x.device).triu_(1)
    return dist[mask].median()


def _provider_fn(provider: str, x: torch.Tensor):
    if provider == BASELINE:
        if x.dim() == 3:
            return lambda: torch.stack([_cdist_median(xb) for xb in x])
        return lambda: _cdist_median(x)
    return lambda: nk.median_pairwise_distance(x, batched=x.dim() == 3)


@pytest.fixture(scope="module", autouse=True)
def _warm_up():
    """Run every provider once on a tiny input, so that one-time initialization (code pages,
    lazy imports) is not counted in the first call's peak memory."""
    x = torch.randn(2, 8, 3, device=nkbench.DEVICE)
    for provider in PROVIDERS:
        with pytest.MonkeyPatch.context() as mp:
            nkbench.use_backend(mp, provider)
            _provider_fn(provider, x)()
            _provider_fn(provider, x[0])()


@pytest.mark.parametrize(("label", "size", "provider"), CASES)
def test_median_pairwise_distance(benchmark, use_provider, label, size, provider):
    use_provider(provider)
    b, n, d = size
    shape = (b, n, d) if b else (n, d)
    data = _cache.get(label, lambda: {"x": nkbench.randn(shape, nkbench.generator(0))})
    x = data["x"]
    sets = max(b, 1)
    m = min(n, 2048)
    roof = nkbench.roofline(x.numel() * 4, sets * n * (n - 1) * d, gemm_shape=(m, d, m))
    if (label, size) == GPU_TARGET:
        roof["gemm_same_size_s"] = 2 * n * d * n / (nkbench.gemm_rate(n, d, n) * 1e9)
    nkbench.check_and_record(
        benchmark, op=OP, label=label, provider=provider, baseline=BASELINE,
        run=_provider_fn(provider, x), baseline_run=_provider_fn(BASELINE, x), cache=data,
        tol=TOL, roof=roof, peak_on_second_call=False, B=b, N=n, d=d, dtype="float32")
    rounds = 1 if label in HUGE else ROUNDS
    benchmark.pedantic(nkbench.timed(_provider_fn(provider, x)), rounds=rounds, iterations=1,
                       warmup_rounds=0)
