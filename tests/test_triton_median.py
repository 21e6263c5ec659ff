"""The Triton median (nats_kernels/triton/median.py): the pieces tests/test_median.py does not
reach through the public op -- the keys of the distance tiles (every pair exactly once, the
folded triangle, padding tiles, bit-identical recomputation), the fused histograms against
``torch.bincount`` of the same keys, the refinement passes over recomputed and over stored keys,
the on-device selection against ``torch.kthvalue``, and results that do not depend on the memory
budget or the number of programs.

Runs where the triton backend runs: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (the
default ``pytest`` run gets there through tests/test_triton_interpret.py, in a subprocess, once
this module is in its list). Without either, the tests that launch kernels are skipped and
``test_median_kernels_compile_for_a_gpu`` compiles every kernel variant for sm_90 instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import nats_kernels as nk

AVAILABLE = nk.backends()["triton"]["available"]
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(
    not AVAILABLE,
    reason="triton backend unavailable here (no CUDA, TRITON_INTERPRET unset); "
    "tests/test_triton_interpret.py runs this module under the interpreter",
)

if AVAILABLE:
    from nats_kernels.triton import median as tm  # registers the kernel
    from nats_kernels.triton.median import DIGIT, NBINS

DEVICES = (["cuda"] if torch.cuda.is_available() else []) + (["cpu"] if INTERPRET else [])
ROOT = Path(__file__).resolve().parent.parent
DTYPES = (torch.float32, torch.float64)
median = nk.median_pairwise_distance


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("NATS_KERNELS_BACKEND", "triton")


def lattice(n, d, r, dtype, device, seed):
    """n points with integer coordinates in [-r, r], closed under negation (mean exactly 0, one
    zero point when n is odd): every norm, dot product and squared distance is a small integer,
    exact in any order of summation, and many distances tie."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(-r, r + 1, (n // 2, d), generator=g)
    pts = torch.cat([p, -p, torch.zeros(n % 2, d, dtype=p.dtype)])
    return pts[torch.randperm(n, generator=g)].to(dtype).to(device)


def key_dtype(work):
    return torch.int64 if work == torch.float64 else torch.int32


def direct_keys(P, b: int) -> torch.Tensor:
    """The keys of problem b from the prepared (scaled, centred) points by explicit coordinate
    differences in float64, rounded to the work dtype: the kernel's keys when all distances are
    exact (lattice data). Sorted."""
    a = P.a[b].double().cpu()
    if P.pairwise:
        i, j = torch.triu_indices(a.shape[0], a.shape[0], offset=1)
        diff = a[i] - a[j]
    else:
        bb = P.b[b].double().cpu()
        diff = (a[:, None, :] - bb[None, :, :]).reshape(-1, a.shape[1])
    sq = (diff * diff).sum(1).to(P.work)
    return sq.view(key_dtype(P.work)).sort().values


def first_pass(P, store=True):
    batch, device = P.a.shape[0], P.a.device
    counts = torch.zeros((batch, NBINS), dtype=torch.int64, device=device)
    prefix = torch.zeros(batch, dtype=torch.int64, device=device)
    keys = None
    if store:
        keys = torch.full((batch, P.keys_per_problem), 7, dtype=P.key_dtype, device=device)
    tm.tile_pass(P, counts, prefix, tm.shifts(P.work)[0], True, keys)
    return counts, prefix, keys


def bincount(keys: torch.Tensor, shift: int, prefix: int | None = None) -> torch.Tensor:
    """The histogram the kernels must produce, by torch on the same (valid) keys."""
    keys = keys[keys >= 0].to(torch.int64)
    if prefix is not None:
        keys = keys[(keys >> (shift + DIGIT)) == prefix]
    return torch.bincount((keys >> shift) & (NBINS - 1), minlength=NBINS)


# --------------------------------------------------------------------------------------------
# Tiles: keys, coverage, recomputation


# N = 150: 2 x 2 tiles; N = 300: 3 x 3 tiles, folded as 4 x 4 (a padding row and column that
# select no pair); cross 150 x 70 and 300 x 129 (a column of tiles with one live column).
SHAPES = [(150, None), (300, None), (150, 70), (300, 129)]


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, m", SHAPES, ids=str)
def test_stored_keys_are_every_pair_once(device, dtype, n, m):
    """The first pass stores each pair's key exactly once (pairs i < j for the pairwise form,
    dropped and padding slots as -1), bit-equal to the squared distance computed directly (exact
    lattice data), and its fused histogram equals torch.bincount of those keys' top digit."""
    x = torch.stack([lattice(n, 5, 7, dtype, device, seed=n), lattice(n, 5, 3, dtype, device, 1)])
    y = None if m is None else lattice(m, 5, 7, dtype, device, seed=m).expand(2, m, 5)
    P = tm.prepare(x, y)
    counts, _, keys = first_pass(P)
    assert counts.dtype == torch.int64 and keys.dtype == key_dtype(dtype)
    assert bool((keys[keys < 0] == -1).all()), "slots are either a key or -1"
    for b in range(2):
        valid = keys[b][keys[b] >= 0]
        assert valid.numel() == P.n_pairs
        assert torch.equal(valid.sort().values.cpu(), direct_keys(P, b)), f"problem {b}"
        assert torch.equal(counts[b].cpu(), bincount(keys[b], tm.shifts(dtype)[0]).cpu())
        assert int(counts[b].sum()) == P.n_pairs


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pairwise", (True, False))
def test_recomputed_tiles_are_bit_identical(device, dtype, pairwise):
    """Random data (distances not exact): a second computation of every tile gives the same
    bits, and the pass that does not store histograms exactly what the storing one did."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 150, 37, generator=g, dtype=torch.float64).to(dtype).to(device)
    y = None if pairwise else torch.randn(2, 90, 37, generator=g, dtype=torch.float64).to(
        dtype).to(device)
    P = tm.prepare(x, y)
    counts, _, keys = first_pass(P)
    counts2, _, keys2 = first_pass(P)
    counts3, _, _ = first_pass(P, store=False)
    assert torch.equal(keys, keys2)
    assert torch.equal(counts, counts2) and torch.equal(counts, counts3)
    # sanity: the keys are the squared distances to float rounding
    for b in range(2):
        valid = keys[b][keys[b] >= 0].view(P.work).double().sort().values.cpu()
        direct = direct_keys(P, b).view(P.work).double()
        torch.testing.assert_close(valid, direct, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                   atol=1e-6 if dtype == torch.float32 else 1e-14)


# --------------------------------------------------------------------------------------------
# Refinement passes and selection


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pairwise", (True, False))
def test_passes_select_the_kth_key(device, dtype, pairwise):
    """Pass by pass: the recomputing and the stored-keys histograms agree with each other and
    with torch.bincount of the keys matching the prefix; the prefix after each select is the
    top digits of the k-th smallest key (torch.kthvalue), the rank the position within its bin;
    after the last pass the prefix is that key. The first, median and last k; random data, a
    batch of 2."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 140, 9, generator=g, dtype=torch.float64).to(dtype).to(device)
    y = None if pairwise else torch.randn(2, 77, 9, generator=g, dtype=torch.float64).to(
        dtype).to(device)
    P = tm.prepare(x, y)
    batch, dev = 2, P.a.device
    passes = tm.shifts(dtype)
    assert len(passes) == (3 if dtype == torch.float32 else 6)
    _, _, keys = first_pass(P)
    valid = [keys[b][keys[b] >= 0].to(torch.int64).cpu() for b in range(batch)]
    out = torch.empty(batch, dtype=P.work, device=dev)
    for k in (0, (P.n_pairs - 1) // 2, P.n_pairs - 1):
        want = [int(torch.kthvalue(v, k + 1).values) for v in valid]
        prefix = torch.zeros(batch, dtype=torch.int64, device=dev)
        rank = torch.full((batch,), k, dtype=torch.int64, device=dev)
        for p, shift in enumerate(passes):
            counts = torch.zeros((batch, NBINS), dtype=torch.int64, device=dev)
            if p == 0:
                tm.tile_pass(P, counts, prefix, shift, True)
            else:
                stored = torch.zeros_like(counts)
                tm.stored_pass(P, keys, stored, prefix, shift)
                tm.tile_pass(P, counts, prefix, shift, False)
                assert torch.equal(counts, stored), f"k={k} pass {p}: recomputed vs stored"
                for b in range(batch):
                    expected = bincount(keys[b], shift, int(prefix[b]))
                    assert torch.equal(counts[b].cpu(), expected.cpu()), f"k={k} pass {p}"
            tm.select(P, counts, prefix, rank, out, p == len(passes) - 1, True)
            assert not counts.any(), "select clears the histogram for the next pass"
            for b in range(batch):
                assert int(prefix[b]) == want[b] >> shift, f"k={k} pass {p} problem {b}"
                below = int((valid[b] < (want[b] >> shift) << shift).sum())
                assert int(rank[b]) == k - below
        # out = key value * 2**e * 2**e (squared): compare the unscaled key
        scale = torch.ldexp(torch.ones((), dtype=torch.float64), 2 * P.exponent.cpu().double())
        unscaled = (out.cpu().double() / scale).to(P.work).view(key_dtype(dtype)).to(torch.int64)
        assert unscaled.tolist() == want, (unscaled.tolist(), want)


# --------------------------------------------------------------------------------------------
# The result does not depend on the budget or the geometry of the launches


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_budget_store_or_recompute_same_result(device, dtype):
    """A budget that keeps the keys and one that forces recomputation on every pass give
    bit-identical results -- exact on lattice data (batched, pairwise and cross), and equal bits
    even on random data, since the stored keys are the recomputed keys."""
    x = torch.stack([lattice(151, 6, 9, dtype, device, s) for s in range(2)])
    y = torch.stack([lattice(133, 6, 9, dtype, device, 10 + s) for s in range(2)])
    g = torch.Generator().manual_seed(5)
    xr = torch.randn(2, 151, 6, generator=g, dtype=torch.float64).to(dtype).to(device)
    yr = torch.randn(2, 133, 6, generator=g, dtype=torch.float64).to(dtype).to(device)
    store_budget = 2**30
    for a, b, exact in ((x, None, True), (x, y, True), (xr, None, False), (xr, yr, False)):
        P = tm.prepare(a, b)
        tiny = P.keys_bytes()  # keys are kept when they fit half the budget: recompute
        assert P.keys_bytes() <= store_budget // 2 and P.keys_bytes() > tiny // 2
        kept = median(a, b, batched=True, squared=True, memory_budget=store_budget)
        recomputed = median(a, b, batched=True, squared=True, memory_budget=tiny)
        assert torch.equal(kept, recomputed), (kept, recomputed)
        if exact:  # the lower median of the exactly representable squared distances
            for i in range(2):
                ai = a[i].double().cpu()
                if b is None:
                    iu, ju = torch.triu_indices(ai.shape[0], ai.shape[0], offset=1)
                    sq = ((ai[iu] - ai[ju]) ** 2).sum(1)
                else:
                    sq = ((ai[:, None] - b[i].double().cpu()[None]) ** 2).sum(-1).flatten()
                assert kept[i].item() == torch.median(sq).item()


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_programs_per_launch_do_not_change_the_counts(device, monkeypatch):
    """Each program walks tiles w, w + workers, ... and adds its histogram with one integer
    atomic: any number of programs gives the same counts, hence the same result."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 300, 11, generator=g).to(device)  # 10 tiles per problem, folded
    y = torch.randn(2, 140, 11, generator=g).to(device)
    base = [median(x, batched=True, memory_budget=1000),
            median(x, y, batched=True, memory_budget=2**30)]
    for workers in (1, 3):
        monkeypatch.setattr(tm, "WORKERS", workers * 2)  # per problem: WORKERS / B
        P = tm.prepare(x, None)
        assert P.workers == workers and P.n_tiles == 10
        got = [median(x, batched=True, memory_budget=1000),
               median(x, y, batched=True, memory_budget=2**30)]
        for a, b in zip(got, base):
            assert torch.equal(a, b), (workers, a, b)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_problem_does_not_disturb_its_neighbours(device):
    """A NaN problem's keys are garbage (NaN distances become key 0); its own result is NaN and
    the batch's other problems are the results they get alone."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 130, 4, generator=g).to(device)
    x[1, 5, 2] = float("nan")
    got = median(x, batched=True)
    assert torch.isnan(got[1]) and not torch.isnan(got[[0, 2]]).any()
    for i in (0, 2):
        torch.testing.assert_close(got[i], median(x[i]), rtol=1e-5, atol=0)


@needs_triton
def test_shifts_cover_the_value_bits():
    """DIGIT-bit digits from bit 0 up cover bits 0..30 (float32) or 0..62 (float64), 3 or 6
    passes, and the top digit's bins hold every possible key."""
    m = tm
    for work, bits in ((torch.float32, 31), (torch.float64, 63)):
        s = m.shifts(work)
        assert s == sorted(s, reverse=True) and s[-1] == 0
        assert all(a - b == m.DIGIT for a, b in zip(s, s[1:]))
        assert s[0] < bits <= s[0] + m.DIGIT
    assert len(m.shifts(torch.float32)) == 3 and len(m.shifts(torch.float64)) == 6
    assert m.BT * m.BT < 2**31  # per-tile histogram counts fit int32


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_median_on_triton(device):
    """The custom op (schema, fake kernel, no mutation) with the triton kernel behind it."""
    from nats_kernels import _dispatch

    assert _dispatch.backend_name("median_pairwise_distance", device) == "triton"
    op = torch.ops.nats_kernels.median_pairwise_distance.default
    x = torch.randn(2, 20, 3, device=device)
    y = torch.randn(2, 9, 3, device=device)
    torch.library.opcheck(op, (x, None, False, 2**20))
    torch.library.opcheck(op, (x, y, True, 1000))
