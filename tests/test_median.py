"""median_pairwise_distance (SPEC §3) against torch.median of explicitly computed distances."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DTYPES, assert_close, cases, make
from hypothesis import given, settings
from hypothesis import strategies as st

import nats_kernels as nk

OP = "median_pairwise_distance"


def oracle(x, y=None, squared=False):
    """Lower median of explicit float64 distances: the upper triangle (pairwise) or all pairs."""
    x = x.double().reshape(x.shape[0], -1)
    if y is None:
        d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        iu = torch.triu_indices(len(x), len(x), 1)
        d2 = d2[iu[0], iu[1]]
    else:
        y = y.double().reshape(y.shape[0], -1)
        d2 = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1).reshape(-1)
    return torch.median(d2 if squared else d2.sqrt())


@pytest.mark.parametrize("device,backend", cases(OP))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", [(2, 1), (3, 7), (7, 3), (59, 59), (97, 2)])
@pytest.mark.parametrize("squared", [False, True])
def test_pairwise_matches_oracle(device, backend, dtype, n, d, squared):
    x = make((n, d), dtype, device, seed=n + d)
    got = nk.median_pairwise_distance(x, squared=squared)
    assert got.shape == () and got.dtype == dtype
    assert_close(got.cpu(), oracle(x.cpu(), squared=squared), dtype, "pairwise median")


@pytest.mark.parametrize("device,backend", cases(OP))
@pytest.mark.parametrize("n,m", [(1, 1), (1, 7), (7, 1), (59, 8), (8, 59)])
def test_cross_matches_oracle(device, backend, n, m):
    x = make((n, 3, 2), torch.float32, device, seed=1, noncontiguous=True)
    y = make((m, 3, 2), torch.float32, device, seed=2, noncontiguous=True)
    assert_close(nk.median_pairwise_distance(x, y).cpu(), oracle(x.cpu(), y.cpu()),
                 torch.float32, "cross median")


@pytest.mark.parametrize("device,backend", cases(OP))
@pytest.mark.parametrize("budget", [2_000, 50_000, None])
def test_tiles_and_batches(device, backend, budget):
    x = make((3, 59, 2, 3), torch.float64, device, seed=3)
    y = make((3, 13, 2, 3), torch.float64, device, seed=4)
    got = nk.median_pairwise_distance(x, batched=True, memory_budget=budget)
    got_cross = nk.median_pairwise_distance(x, y, batched=True, memory_budget=budget)
    assert got.shape == (3,) and got_cross.shape == (3,)
    for b in range(3):
        assert_close(got[b].cpu(), oracle(x[b].cpu()), torch.float64, f"batch {b}")
        assert_close(got_cross[b].cpu(), oracle(x[b].cpu(), y[b].cpu()), torch.float64, f"x{b}")
    again = nk.median_pairwise_distance(x, batched=True, memory_budget=budget)
    assert torch.equal(got, again), "a fixed tiling gives bit-identical results"


@pytest.mark.parametrize("device,backend", cases(OP))
def test_ties_and_identical_points_are_exact(device, backend):
    lattice = torch.tensor([[i, j] for i in range(5) for j in range(4)], dtype=torch.float32,
                           device=device)
    assert nk.median_pairwise_distance(lattice, squared=True) == oracle(lattice.cpu(), squared=True)
    same = torch.ones(9, 4, device=device)
    assert nk.median_pairwise_distance(same) == 0


@pytest.mark.parametrize("device,backend", cases(OP))
def test_nonfinite_only_poisons_its_problem(device, backend):
    x = make((3, 20, 4), torch.float32, device, seed=5)
    x[0, 3, 1] = math.nan
    x[2, 0, 0] = math.inf
    got = nk.median_pairwise_distance(x, batched=True)
    assert torch.isnan(got[0]) and torch.isnan(got[2])
    assert_close(got[1].cpu(), oracle(x[1].cpu()), torch.float32, "clean problem")


@pytest.mark.parametrize("device,backend", cases(OP))
def test_medium_count(device, backend):
    x = make((3000, 2), torch.float32, device, seed=6)
    d = torch.pdist(x.double().cpu())
    assert_close(nk.median_pairwise_distance(x).cpu(), d.median(), torch.float32, "N=3000")


@pytest.mark.parametrize("device,backend", cases(OP))
@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 40), m=st.integers(0, 12), d=st.integers(1, 6),
       budget=st.sampled_from([1_000, 30_000, 1 << 24]), seed=st.integers(0, 2**16))
def test_property(device, backend, n, m, d, budget, seed):
    x = make((n, d), torch.float64, device, seed=seed)
    y = make((m, d), torch.float64, device, seed=seed + 1) if m else None
    got = nk.median_pairwise_distance(x, y, memory_budget=budget)
    assert_close(got.cpu(), oracle(x.cpu(), None if y is None else y.cpu()), torch.float64, "prop")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    assert_close(nk.median_pairwise_distance(x[perm] + 3.0, None if y is None else y + 3.0),
                 got, torch.float64, "permuted and translated")


@pytest.mark.parametrize(
    "call,err,match",
    [
        (lambda: nk.median_pairwise_distance([[0.0], [1.0]]), TypeError, "x"),
        (lambda: nk.median_pairwise_distance(torch.zeros(5, 2, dtype=torch.int64)), TypeError, "x"),
        (lambda: nk.median_pairwise_distance(torch.zeros(1, 2)), ValueError, "N = 1"),
        (lambda: nk.median_pairwise_distance(torch.tensor(1.0)), ValueError, "x must have shape"),
        (lambda: nk.median_pairwise_distance(torch.zeros(4), batched=True), ValueError, "x"),
        (lambda: nk.median_pairwise_distance(torch.zeros(4, 2), torch.zeros(3, 2).double()),
         TypeError, "y"),
        (lambda: nk.median_pairwise_distance(torch.zeros(4, 2), torch.zeros(3, 3)), ValueError,
         "y must have shape"),
        (lambda: nk.median_pairwise_distance(torch.zeros(2, 4, 2), torch.zeros(3, 3, 2),
                                             batched=True), ValueError, "y must have shape"),
        (lambda: nk.median_pairwise_distance(torch.zeros(4, 2), torch.zeros(0, 2)), ValueError,
         "M = 0"),
        (lambda: nk.median_pairwise_distance(torch.zeros(4, 2), memory_budget=0), ValueError,
         "memory_budget"),
        (lambda: nk.median_pairwise_distance(torch.zeros(4, 2), memory_budget=1e6), TypeError,
         "memory_budget"),
        (lambda: nk.median_pairwise_distance(torch.zeros(4, 2), memory_budget=True), TypeError,
         "memory_budget"),
    ],
)
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()
