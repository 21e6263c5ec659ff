"""Correctness of design §3, ``median_pairwise_distance``: the exact lower median of pairwise (or
cross) Euclidean distances, tile by tile, without the N x N matrix.

Every result is checked against an independent float64 oracle written here (explicit coordinate
differences, then ``torch.median`` of the explicit upper triangle); the library's reference is
never called. Every test runs once per (device, backend) implementing the op (``cases``), with
NATS_KERNELS_BACKEND set to that backend by conftest; the bad-input tests, whose rejections come
before any backend is chosen, run once.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import (
    DTYPES,
    PROPERTY,
    TOL,
    assert_close,
    cases,
    make,
    raises_before_dispatch,
    same_bits,
)
from hypothesis import given
from hypothesis import strategies as st

import nats_kernels as nk
from nats_kernels._validate import acc_dtype

# Single-threaded by default (conftest: a 2-thread pool on a shared 2-core machine makes small ops
# orders of magnitude slower); test_medium_n_counts runs under the full pool.
pytestmark = pytest.mark.single_thread

OP = "median_pairwise_distance"
backends = pytest.mark.parametrize("device, backend", cases(OP))
median = nk.median_pairwise_distance

# The budgets that force many small tiles (and, being far below the size of the keys, the path
# that recomputes every tile on every radix pass) next to the default one.
TINY_BUDGETS = (2000, 50_000)
SIZES_N = (2, 3, 7, 59, 97)
SIZES_D = (1, 3, 7, 59)


# --------------------------------------------------------------------------------------------
# The oracle


def pair_sq(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """float64 squared distances of the pairs i < j of the rows of ``x`` (or of every row of x
    with every row of y), from explicit coordinate differences. x: (N, *feat)."""
    x = x.detach().to("cpu", torch.float64).reshape(x.shape[0], -1)
    if y is None:
        i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1)
        diff = x[i] - x[j]
    else:
        y = y.detach().to("cpu", torch.float64).reshape(y.shape[0], -1)
        diff = (x[:, None, :] - y[None, :, :]).reshape(-1, x.shape[1])
    return (diff * diff).sum(1)


def oracle(x, y=None, squared=False) -> torch.Tensor:
    """Lower median (element (n-1)//2 of the sorted n values, what torch.median returns)."""
    med = torch.median(pair_sq(x, y))
    return med if squared else med.sqrt()


def oracle_batched(x, y=None, squared=False) -> torch.Tensor:
    return torch.stack(
        [oracle(x[b], None if y is None else y[b], squared) for b in range(x.shape[0])]
    )


def exact_expected(sq: torch.Tensor, dtype, squared: bool) -> torch.Tensor:
    """The result the op must return when the float64 oracle's squared median ``sq`` is exactly
    representable in the work dtype: rounded once to ``dtype`` (squared), or its correctly
    rounded square root in the work dtype (numpy's IEEE sqrt), then rounded to ``dtype``. The
    work dtype is the accumulation dtype (design §3.1: distances are computed in float32,
    float64 for float64 inputs)."""
    if squared:
        return sq.to(dtype)
    root = torch.from_numpy(np.asarray(np.sqrt(sq.to(acc_dtype(dtype)).cpu().numpy())))
    return root.to(dtype)


def assert_matches(got, expected, squared: bool, what=""):
    """Squared: bit for bit. Distance: within one ulp of the correctly rounded square root,
    since square roots differ by an ulp between implementations (torch's vectorized CPU sqrt is
    not correctly rounded; the C++ kernel's std::sqrt is), the selection itself being exact."""
    if squared:
        assert_exact(got, expected, what)
    else:
        assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype}, expected {expected.dtype}"
        torch.testing.assert_close(
            got.cpu().double(), expected.cpu().double(), atol=0,
            rtol=torch.finfo(expected.dtype).eps, msg=lambda m: f"{what}: {m}",
        )


def assert_exact_at_budgets(x, sq, dtype, budgets, what=""):
    """The median of ``x`` at each memory budget, squared and not, is the exact result for the
    oracle's squared median ``sq`` (``exact_expected``), judged by ``assert_matches``."""
    for budget in budgets:
        for squared in (False, True):
            assert_matches(median(x, squared=squared, memory_budget=budget),
                           exact_expected(sq, dtype, squared), squared,
                           f"{what} budget={budget} squared={squared}")


def lattice(k, d, r, dtype, device, seed, zeros=0):
    """2k + zeros points with integer coordinates in [-r, r], closed under negation (so their
    mean is exactly 0): every squared distance, norm and dot product is a small integer, exact in
    every dtype and every summation order. Many distances tie."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(-r, r + 1, (k, d), generator=g)
    pts = torch.cat([p, -p, torch.zeros(zeros, d, dtype=p.dtype)])
    pts = pts[torch.randperm(pts.shape[0], generator=g)]
    return pts.to(dtype).to(device)


def assert_exact(got, expected, what=""):
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype}, expected {expected.dtype}"
    assert torch.equal(got.cpu(), expected.cpu()), (
        f"{what}: got {got.tolist()}, expected {expected.tolist()}"
    )


# --------------------------------------------------------------------------------------------
# Against the oracle: sizes, dtypes, layouts


@backends
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", SIZES_D)
@pytest.mark.parametrize("n", SIZES_N)
def test_pairwise_matches_oracle(device, backend, n, d, dtype):
    # float32 is held to the table's rtol (2e-5), tighter than design §3.3's 1e-4 at unit scale.
    x = make((n, d), dtype, device, seed=1000 * n + d)
    for squared in (False, True):
        got = median(x, squared=squared)
        assert got.shape == () and got.device == x.device
        assert_close(got, oracle(x, squared=squared), dtype, f"N={n} d={d} squared={squared}")


@backends
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("n", (7, 59, 97))
def test_tiny_budgets_match_oracle(device, backend, n, dtype):
    """Many tiles, tile boundaries at awkward N (partial last tiles, diagonal tiles cut short)."""
    x = make((n, 7), dtype, device, seed=n)
    y = make((n + 4, 7), dtype, device, seed=n + 1)
    for budget in TINY_BUDGETS:
        assert_close(median(x, memory_budget=budget), oracle(x), dtype, f"budget={budget}")
        assert_close(
            median(x, y, memory_budget=budget), oracle(x, y), dtype, f"cross, budget={budget}"
        )


@backends
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_two_points(device, backend, dtype):
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=dtype, device=device)
    assert_exact(median(x), torch.tensor(5.0, dtype=dtype), "distance")
    assert_exact(median(x, squared=True), torch.tensor(25.0, dtype=dtype), "squared")
    x = make((2, 59), dtype, device, seed=2)
    assert_close(median(x), oracle(x), dtype, "N=2 random")


@backends
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_lower_median_of_an_even_count(device, backend, dtype):
    # 1-d points 0, 1, 3, 7: the six distances sorted are 1 2 3 4 6 7. The lower median is 3
    # (not 3.5, not 4).
    x = torch.tensor([0.0, 1.0, 3.0, 7.0], dtype=dtype, device=device)
    assert_exact(median(x), torch.tensor(3.0, dtype=dtype))
    assert_exact(median(x, squared=True), torch.tensor(9.0, dtype=dtype))
    # Cross: distances 1 2 3 4 -> 2; with an odd count 1 2 3 4 5 -> 3.
    zero = torch.zeros(1, dtype=dtype, device=device)
    y = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=dtype, device=device)
    assert_exact(median(zero, y), torch.tensor(2.0, dtype=dtype))
    assert_exact(median(y, zero), torch.tensor(2.0, dtype=dtype))
    y5 = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0], dtype=dtype, device=device)
    assert_exact(median(zero, y5), torch.tensor(3.0, dtype=dtype))


@backends
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noncontiguous_inputs(device, backend, dtype):
    tol_what = f"noncontiguous [{dtype}]"
    x = make((59, 7), dtype, device, seed=3, noncontiguous=True)
    y = make((33, 7), dtype, device, seed=4, noncontiguous=True)
    assert not x.is_contiguous() and not y.is_contiguous()
    assert_close(median(x), oracle(x), dtype, tol_what)
    assert_close(median(x, y), oracle(x, y), dtype, tol_what + " cross")
    # Transposed storage: the feature dim has the large stride.
    xt = make((7, 59), dtype, device, seed=5).t()
    yt = make((7, 33), dtype, device, seed=6).t()
    assert_close(median(xt), oracle(xt), dtype, tol_what + " transposed")
    assert_close(median(xt, yt, squared=True), oracle(xt, yt, True), dtype, tol_what + " T cross")
    # Non-contiguous multi-dim features, batched.
    xb = make((2, 13, 3, 5), dtype, device, seed=7, noncontiguous=True)
    yb = make((2, 6, 3, 5), dtype, device, seed=8, noncontiguous=True)
    assert_close(median(xb, batched=True), oracle_batched(xb), dtype, tol_what + " batched")
    assert_close(
        median(xb, yb, batched=True), oracle_batched(xb, yb), dtype, tol_what + " batched cross"
    )


@backends
@pytest.mark.parametrize("dtype", (torch.float16, torch.float32, torch.float64), ids=str)
def test_multidim_features_are_flattened(device, backend, dtype):
    x = make((23, 3, 4, 5), dtype, device, seed=9)
    y = make((8, 3, 4, 5), dtype, device, seed=10)
    assert_close(median(x), oracle(x), dtype, "images")
    assert_close(median(x, y), oracle(x, y), dtype, "images cross")
    # Flattening happens before dispatch: the same problem as (N, 60), bit for bit.
    assert_exact(median(x), median(x.reshape(23, 60)), "images vs flat")
    assert_exact(median(x, y), median(x.reshape(23, 60), y.reshape(8, 60)), "cross vs flat")
    xb = make((3, 23, 3, 4, 5), dtype, device, seed=11)
    yb = make((3, 8, 3, 4, 5), dtype, device, seed=12)
    got = median(xb, yb, batched=True, squared=True)
    assert got.shape == (3,)
    assert_close(got, oracle_batched(xb, yb, True), dtype, "batched images cross")


@backends
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_dim_x_means_d_1(device, backend, dtype):
    x = make((97,), dtype, device, seed=13)
    y = make((30,), dtype, device, seed=14)
    assert_close(median(x), oracle(x), dtype, "(N,)")
    assert_close(median(x, y), oracle(x, y), dtype, "(N,) cross")
    assert_exact(median(x), median(x[:, None]), "(N,) vs (N, 1)")
    assert_exact(median(x, y, squared=True), median(x[:, None], y[:, None], squared=True))
    xb = make((2, 40), dtype, device, seed=15)
    assert_close(median(xb, batched=True), oracle_batched(xb[..., None]), dtype, "(B, N)")


# --------------------------------------------------------------------------------------------
# Ties and exactly representable distances: the answer is exact


@backends
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k, d, r", [(1, 1, 3), (3, 3, 2), (29, 7, 5), (48, 59, 20), (48, 3, 1)])
def test_lattice_ties_are_exact(device, backend, k, d, r, dtype):
    """Integer points (N = 2k + 1, so odd and even pair counts): many equal distances, all
    exactly representable, so the result equals the oracle bit for bit, at every budget."""
    x = lattice(k, d, r, dtype, device, seed=k * d, zeros=1)
    assert_exact_at_budgets(x, oracle(x, squared=True), dtype, (None, *TINY_BUDGETS),
                            f"k={k} d={d}")


@backends
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32, torch.float64), ids=str)
def test_duplicated_points(device, backend, dtype):
    g = torch.Generator().manual_seed(16)
    p = torch.randint(-6, 7, (3, 5), generator=g)
    # One dominant duplicated point: more than half of the pairs are at distance exactly 0.
    rows = torch.cat([torch.zeros(30, 5, dtype=p.dtype), p[[0] * 5], -p[[0] * 5]])
    x = rows[torch.randperm(40, generator=g)].to(dtype).to(device)
    assert oracle(x, squared=True) == 0
    assert_exact(median(x), torch.tensor(0.0, dtype=dtype), "dominant duplicate")
    # A few distinct points, each repeated: ties everywhere, the median is a repeated distance.
    idx = torch.randint(0, 3, (25,), generator=g)
    x = torch.cat([p[idx], -p[idx]]).to(dtype).to(device)
    assert_exact_at_budgets(x, oracle(x, squared=True), dtype, (None, 2000), "repeated points")
    # Cross: y repeats rows of x.
    y = torch.cat([p[idx[:7]], -p[idx[:7]]]).to(dtype).to(device)
    assert_exact(median(x, y, squared=True), exact_expected(oracle(x, y, True), dtype, True))


@backends
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", (2, 7, 97))
def test_identical_points_give_zero(device, backend, n, dtype):
    zero = torch.tensor(0.0, dtype=dtype)
    row = make((1, 59), dtype, device, seed=n, scale=30.0)
    for x in (row.expand(n, 59), row.repeat(n, 1)):  # stride 0, and a real copy
        assert_exact(median(x), zero, "identical")
        assert_exact(median(x, squared=True), zero, "identical squared")
        assert_exact(median(x, row.expand(3, 59)), zero, "identical cross")
        assert_exact(median(x, memory_budget=2000), zero, "identical, tiny budget")


@backends
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_squared_is_the_square_of_the_distance(device, backend, dtype):
    # Selection runs on squared distances and sqrt is monotone: the distance median is the
    # square root (in the work dtype) of the squared median, exactly.
    for n, d, with_y in [(59, 7, False), (97, 3, True), (7, 59, True), (2, 1, False)]:
        x = make((n, d), dtype, device, seed=n + d)
        y = make((n + 3, d), dtype, device, seed=n - d) if with_y else None
        sq = median(x, y, squared=True)
        assert_matches(median(x, y), exact_expected(sq, dtype, False), False, f"N={n} d={d}")
        assert_close(sq, oracle(x, y, squared=True), dtype, "squared")


# --------------------------------------------------------------------------------------------
# Cross sets and batches


@backends
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, m", [(1, 1), (1, 7), (7, 1), (1, 60), (3, 5), (4, 6), (59, 97)])
def test_cross_matches_oracle(device, backend, n, m, dtype):
    x = make((n, 7), dtype, device, seed=n)
    y = make((m, 7), dtype, device, seed=100 + m, scale=1.5)
    for squared in (False, True):
        got = median(x, y, squared=squared)
        assert got.shape == ()
        assert_close(got, oracle(x, y, squared), dtype, f"N={n} M={m} squared={squared}")


@backends
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", (1, 3))
@pytest.mark.parametrize("with_y", (False, True))
def test_batches_match_their_own_oracle(device, backend, batch, with_y, dtype):
    # Different scales and offsets per batch element: a mix-up between elements shows.
    scale = torch.tensor([1.0, 4.0, 0.25][:batch], dtype=torch.float64).view(batch, 1, 1)
    x = (make((batch, 59, 7), torch.float64, seed=17) * scale + scale).to(dtype).to(device)
    y = None
    if with_y:
        y = (make((batch, 30, 7), torch.float64, seed=18) * scale).to(dtype).to(device)
    expected = oracle_batched(x, y)
    for budget in (None, 50_000):
        got = median(x, y, batched=True, memory_budget=budget)
        assert got.shape == (batch,) and got.dtype == dtype
        assert_close(got, expected, dtype, f"B={batch} y={with_y} budget={budget}")


@backends
def test_empty_batch(device, backend):
    for dtype in DTYPES:
        x = make((0, 5, 3), dtype, device)
        got = median(x, batched=True)
        assert got.shape == (0,) and got.dtype == dtype and got.device == x.device
        got = median(x, make((0, 4, 3), dtype, device), batched=True, squared=True)
        assert got.shape == (0,) and got.dtype == dtype


# --------------------------------------------------------------------------------------------
# Non-finite inputs, extreme magnitudes


@backends
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_input_gives_nan_for_its_problem_only(device, backend, dtype):
    x = make((4, 23, 5), dtype, device, seed=19)
    x[1, 4, 2] = math.nan
    x[2, 0, 0] = math.inf
    x[3, 22, 4] = -math.inf
    for budget in (None, 2000):
        got = median(x, batched=True, memory_budget=budget)
        assert torch.isnan(got[1:]).all(), got
        assert_close(got[:1], oracle(x[0])[None], dtype, f"finite element, budget={budget}")
    # Cross: a non-finite value in y poisons its own problem only.
    x = make((3, 11, 5), dtype, device, seed=20)
    y = make((3, 9, 5), dtype, device, seed=21)
    y[0, 8, 0] = -math.inf
    x[2, 0, 3] = math.nan
    got = median(x, y, batched=True, squared=True)
    assert torch.isnan(got[0]) and torch.isnan(got[2])
    assert_close(got[1:2], oracle(x[1], y[1], True)[None], dtype, "cross finite element")
    # Unbatched.
    x = make((7, 3), dtype, device, seed=22)
    for bad in (math.nan, math.inf, -math.inf):
        xb = x.clone()
        xb[6, 1] = bad
        assert torch.isnan(median(xb)) and torch.isnan(median(x, xb))


EXTREME = [
    (dtype, k)
    for dtype, ks in [
        (torch.bfloat16, (-100, -40, 40, 100)),
        (torch.float32, (-100, -40, 40, 100)),
        (torch.float64, (-1000, -400, 400, 1000)),
    ]
    for k in ks
]


@backends
@pytest.mark.parametrize("dtype, k", EXTREME, ids=str)
def test_extreme_magnitudes(device, backend, dtype, k):
    """Unit normal points times 2**k, far from unit scale: the distances are representable, so
    the result must be, to the dtype's relative tolerance (no absolute slack). Squared
    distances beyond the dtype's range are +Inf or 0, as the oracle rounded to the dtype is.
    The oracle unscales the (rounded) inputs by 2**-k first, exactly, so that its own float64
    squares neither overflow nor underflow."""
    rtol = TOL[dtype]["rtol"]
    x = (make((59, 7), torch.float64, seed=23) * 2.0**k).to(dtype).to(device)
    y = (make((30, 7), torch.float64, seed=24) * 2.0**k).to(dtype).to(device)
    for args in ((x,), (x, y)):
        unit = [t.double() * 2.0**-k for t in args]
        expected = oracle(*unit) * 2.0**k
        torch.testing.assert_close(median(*args).double(), expected, rtol=rtol, atol=0)
        sq = oracle(*unit, squared=True) * 2.0**k * 2.0**k  # 0 or inf at the largest |k|
        got = median(*args, squared=True)
        if 0 < sq.to(dtype).abs() < math.inf:
            torch.testing.assert_close(got.double(), sq, rtol=rtol, atol=0)
        else:
            assert_exact(got, sq.to(dtype), f"squared, k={k}")


@backends
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_huge_coordinates_do_not_overflow(device, backend, dtype):
    """Finite coordinates whose squares overflow: distances that do not overflow stay exact."""
    big = torch.finfo(dtype).max / 2
    x = torch.full((5, 3), big, dtype=dtype, device=device)
    assert_exact(median(x), torch.tensor(0.0, dtype=dtype), "identical huge points")
    assert_exact(median(x[:2], x[2:]), torch.tensor(0.0, dtype=dtype), "identical, cross")
    far = torch.tensor([[big], [big], [big], [0.0]], dtype=dtype, device=device)
    # pairs: three at 0, three at `big` -> the lower median is 0
    assert_exact(median(far), torch.tensor(0.0, dtype=dtype), "three equal huge points")
    # 1-d points 0, c, 2c, 3c: distances c c c 2c 2c 3c -> c, however large c is (a power of
    # two, so that every step is exact)
    c = 2.0 ** (math.floor(math.log2(torch.finfo(dtype).max)) - 2)
    line = torch.tensor([0.0, c, 2 * c, 3 * c], dtype=dtype, device=device)
    assert_exact(median(line), torch.tensor(c, dtype=dtype), "distances near the max")


# --------------------------------------------------------------------------------------------
# Memory budget: the selection does not depend on the tiling


@backends
@pytest.mark.parametrize("dtype", (torch.float16, torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("n", (59, 97, 130))
def test_budget_does_not_change_an_exact_result(device, backend, n, dtype):
    """Bit-identical results for every budget (one tile, many tiles, kept keys, recomputed
    keys) on inputs whose distances are exact, so that any difference would be a counting or
    tiling error of the selection. (On random data the distances of a tile themselves depend on
    the GEMM shape by an ulp or so, so there the budgets agree to the dtype's tolerance only:
    test_budget_agrees_on_random_data.)"""
    x = lattice(n // 2, 3, 30, dtype, device, seed=n, zeros=n % 2)
    y = lattice(n // 3, 3, 30, dtype, device, seed=n + 1)
    xb = torch.stack([x, x.flip(0) * 2, -x])
    expected = exact_expected(oracle(x, squared=True), dtype, False)
    expected_cross = exact_expected(oracle(x, y, squared=True), dtype, True)
    expected_b = torch.stack([exact_expected(oracle(r, squared=True), dtype, False) for r in xb])
    first, first_b = median(x), median(xb, batched=True)
    assert_matches(first, expected, False, "default budget")
    assert_matches(first_b, expected_b, False, "batched, default budget")
    for budget in (None, 10**6, *TINY_BUDGETS):
        assert_exact(median(x, memory_budget=budget), first, f"budget={budget}")
        assert_exact(median(x, y, squared=True, memory_budget=budget), expected_cross, "cross")
        assert_exact(median(xb, batched=True, memory_budget=budget), first_b, "batched")


@backends
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_budget_agrees_on_random_data(device, backend, dtype):
    x = make((97, 59), dtype, device, seed=25)
    y = make((61, 59), dtype, device, seed=26)
    ref, ref_cross = median(x), median(x, y)
    for budget in TINY_BUDGETS:
        got, got_cross = median(x, memory_budget=budget), median(x, y, memory_budget=budget)
        # A fixed budget is a fixed tiling: recomputed tiles, and so results, are bit-identical.
        assert_exact(median(x, memory_budget=budget), got, f"rerun, budget={budget}")
        assert_exact(median(x, y, memory_budget=budget), got_cross, f"rerun cross {budget}")
        assert_close(got, ref.double(), dtype, f"budget={budget} vs default")
        assert_close(got_cross, ref_cross.double(), dtype, f"cross budget={budget} vs default")
        assert_close(got, oracle(x), dtype, f"budget={budget}")
        assert_close(got_cross, oracle(x, y), dtype, f"cross budget={budget}")


# --------------------------------------------------------------------------------------------
# The C++ CPU kernel's small path (design §3.4): a problem whose pairs fit one tile gets all its
# keys in one buffer and std::nth_element, with the tiled path's scaling, centring and distance
# formula. It must return the tiled path's bits: median_small_limit(0) (a test knob) makes the
# tiled path solve the same problem, and median_path_counts() says which path ran.

cpu_kernel = pytest.mark.skipif(not nk.backends()["cpu"]["available"],
                                reason="the C++ CPU kernel is not built")


def cpu_path_counts() -> list[int]:
    """(window, radix, small) problems the C++ CPU kernel has solved."""
    return torch.ops.nats_kernels_ext.median_path_counts().tolist()


def small_then_tiled(call, problems: int):
    """``call()`` on the small path, then on the tiled path (small path limit 0); checks that
    each of the ``problems`` finite problems took the path asked for."""
    limit = torch.ops.nats_kernels_ext.median_small_limit
    before = cpu_path_counts()
    small = call()
    middle = cpu_path_counts()
    old = limit(0)
    try:
        tiled = call()
    finally:
        limit(old)
    after = cpu_path_counts()
    ran_small = [b - a for a, b in zip(before, middle)]
    ran_tiled = [b - a for a, b in zip(middle, after)]
    assert ran_small == [0, 0, problems], ran_small
    assert ran_tiled[2] == 0 and sum(ran_tiled) == problems, ran_tiled
    return small, tiled


def assert_same_bits(got, want, what=""):
    assert same_bits(got, want), f"{what}: {got.tolist()} vs {want.tolist()}"


@cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", (1, 7, 16, 17, 1025))  # direct form up to 16, GEMM form above
def test_small_path_gives_the_tiled_paths_bits(d, dtype, monkeypatch):
    """Random data (where the rounding of each distance shows), pairwise and cross, batched and
    not, contiguous, strided and transposed: the small path's result has the tiled path's bits,
    and is within the dtype's tolerance of the oracle."""
    monkeypatch.setenv("NATS_KERNELS_BACKEND", "cpu")
    for n in (2, 3, 7, 59):
        seed = 100 * n + d
        x = make((n, d), dtype, seed=seed)
        y = make((n + 4, d), dtype, seed=seed + 1, scale=2.0) + 1
        xs = make((n, d), dtype, seed=seed + 2, noncontiguous=True)
        xt = make((d, n), dtype, seed=seed + 3).t()
        scale = torch.tensor([1.0, 2.0, 2.0**-5]).view(3, 1, 1)  # float16 squares stay finite
        xb = (make((3, n, d), torch.float64, seed=seed + 4) * scale).to(dtype)
        yb = (make((3, n + 1, d), torch.float64, seed=seed + 5) * scale).to(dtype)
        calls = [  # (what, x, y, batched, problems)
            ("pairwise", x, None, False, 1),
            ("cross", x, y, False, 1),
            ("strided", xs, None, False, 1),
            ("transposed cross", xt, xs, False, 1),
            ("batched", xb, None, True, 3),
            ("batched cross", xb, yb, True, 3),
        ]
        for what, a, b, batched, problems in calls:
            for squared in (False, True):
                label = f"N={n} d={d} {what} squared={squared}"
                small, tiled = small_then_tiled(
                    lambda a=a, b=b, batched=batched, squared=squared: median(
                        a, b, squared=squared, batched=batched), problems)
                assert_same_bits(small, tiled, label)
                expected = oracle_batched(a, b, squared) if batched else oracle(a, b, squared)
                assert_close(small, expected, dtype, label)


@cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_small_path_nonfinite_problems(dtype, monkeypatch):
    """NaN, Inf and -Inf make their own problem NaN on the small path as on the tiled path (no
    path runs for them); the finite problems next to them keep their bits."""
    monkeypatch.setenv("NATS_KERNELS_BACKEND", "cpu")
    x = make((5, 7, 3), dtype, seed=40)
    x[1, 2, 0] = math.nan
    x[2, 6, 2] = math.inf
    x[3, 0, 1] = -math.inf
    small, tiled = small_then_tiled(lambda: median(x, batched=True), 2)
    assert_same_bits(small, tiled, "pairwise")
    assert torch.isnan(small[1:4]).all() and not torch.isnan(small[[0, 4]]).any(), small
    assert_close(small[[0, 4]], oracle_batched(x[[0, 4]]), dtype, "finite problems")
    y = make((5, 4, 3), dtype, seed=41)
    y[4, 3, 2] = -math.inf
    small, tiled = small_then_tiled(lambda: median(x, y, batched=True, squared=True), 1)
    assert_same_bits(small, tiled, "cross")
    assert torch.isnan(small[1:]).all() and not torch.isnan(small[0]), small
    assert_close(small[0], oracle(x[0], y[0], True), dtype, "finite cross problem")
    for bad in (math.nan, math.inf, -math.inf):  # unbatched, in x and in y
        xb = x[0].clone()
        xb[6, 1] = bad
        small, tiled = small_then_tiled(lambda xb=xb: torch.stack([median(xb), median(y[0], xb)]),
                                        0)
        assert torch.isnan(small).all() and torch.isnan(tiled).all(), (bad, small, tiled)


@cpu_kernel
def test_small_path_takes_exactly_the_small_problems(monkeypatch):
    """The small path takes a problem of at most median_small_limit() pairs whose pairs fit one
    tile (its keys then fit the kept-key quarter of the budget too); anything else is tiled."""
    monkeypatch.setenv("NATS_KERNELS_BACKEND", "cpu")
    limit = torch.ops.nats_kernels_ext.median_small_limit
    x = make((59, 7), torch.float32, seed=42)  # 1711 pairs
    y = make((30, 7), torch.float32, seed=43)  # 1770 cross pairs

    def path(call):
        before = cpu_path_counts()
        call()
        ran = [b - a for a, b in zip(before, cpu_path_counts())]
        assert sum(ran) == 1, ran
        return "small" if ran[2] else "tiled"

    assert limit(-1) == 2**18  # the default; a negative argument only reads it
    old = limit(1711)
    try:
        assert path(lambda: median(x)) == "small"  # exactly the limit
        assert path(lambda: median(x, y)) == "tiled"  # 1770 > 1711
        limit(1710)
        assert path(lambda: median(x)) == "tiled"
        limit(old)
        # A tile's side is the largest s with s * s * 4 bytes <= budget / 64: 13 at 50 kB, 2 at
        # 2000 B (fewer than 59 rows); 8 from 16384 B on (8 rows fit), 7 below.
        for budget in TINY_BUDGETS:
            assert path(lambda budget=budget: median(x, memory_budget=budget)) == "tiled"
        assert path(lambda: median(x[:8], memory_budget=16384)) == "small"
        assert path(lambda: median(x[:8], memory_budget=16383)) == "tiled"
        assert path(lambda: median(x[:8], y[:8], memory_budget=16383)) == "tiled"
        assert path(lambda: median(x[:7], y[:8], memory_budget=16384)) == "small"
        # A tile of 512 x 512 at most: 513 points are tiled whatever the budget.
        assert path(lambda: median(make((513, 1), torch.float32))) == "tiled"
        assert path(lambda: median(make((512, 1), torch.float32))) == "small"
    finally:
        limit(old)
    assert limit(-1) == old


@cpu_kernel
@pytest.mark.parametrize("d", (3, 40))
def test_small_batch_in_parallel(d, monkeypatch, threads):
    """A batch of small problems runs in parallel under the full pool (B = 64 problems of 59
    points: chunks of several problems): each problem's bits are those of the same problem
    alone with one thread, on the small path and on the tiled path (by_problem's parallel
    loop)."""
    monkeypatch.setenv("NATS_KERNELS_BACKEND", "cpu")
    scale = torch.logspace(-3, 3, 64, dtype=torch.float64).view(64, 1, 1)
    x = (make((64, 59, d), torch.float64, seed=44) * scale).float()
    x[17, 3, 0] = math.nan
    y = (make((64, 23, d), torch.float64, seed=45) * scale).float()
    torch.set_num_threads(1)
    alone = torch.stack([median(x[i]) for i in range(64)])
    alone_cross = torch.stack([median(x[i], y[i]) for i in range(64)])
    threads()  # the full pool
    small, tiled = small_then_tiled(lambda: median(x, batched=True), 63)
    assert_same_bits(small, alone, "pairwise, small path")
    assert_same_bits(tiled, alone, "pairwise, tiled path")
    small, tiled = small_then_tiled(lambda: median(x, y, batched=True), 63)
    assert_same_bits(small, alone_cross, "cross, small path")
    assert_same_bits(tiled, alone_cross, "cross, tiled path")
    assert_close(small[:17], oracle_batched(x[:17], y[:17]), torch.float32, "cross vs oracle")


# --------------------------------------------------------------------------------------------
# Counts at a medium size: 4.5M pairs


@backends
def test_medium_n_counts(device, backend, threads):
    """N = 3000, d = 2: 4,498,500 pairs (an even count). In float64 the neighbours of the
    median in sorted order are ~1e-7 apart relatively, far above the 1e-10 tolerance, so an
    off-by-one rank would fail. Both the kept-keys path and the recompute path (1 MB budget).
    Under the full thread pool: tiles large enough to be split between threads."""
    threads()
    x = make((3000, 2), torch.float64, device, seed=27)
    expected = oracle(x)
    for budget in (None, 10**6):
        assert_close(median(x, memory_budget=budget), expected, torch.float64, f"budget={budget}")
    x32 = x.float()
    assert_close(median(x32), oracle(x32), torch.float32, "float32")
    # Cross with an odd count: 1499 * 2001 pairs.
    y = make((2001, 2), torch.float64, device, seed=28)
    assert_close(median(x[:1499], y), oracle(x[:1499], y), torch.float64, "cross")


# --------------------------------------------------------------------------------------------
# Properties (hypothesis)


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    n = draw(st.integers(2, 40))
    d = draw(st.integers(1, 12))
    m = draw(st.one_of(st.none(), st.integers(1, 40)))
    budget = draw(st.sampled_from([None, 2000, 50_000, 10**6]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dtype, n, d, m, budget, seed


def drawn(problem, device):
    dtype, n, d, m, budget, seed = problem
    x = make((n, d), dtype, device, seed=seed)
    y = None if m is None else make((m, d), dtype, device, seed=seed + 1, scale=2.0)
    return x, y, budget


@backends
@PROPERTY
@given(problem=problems(), squared=st.booleans())
def test_property_matches_oracle(device, backend, problem, squared):
    x, y, budget = drawn(problem, device)
    got = median(x, y, squared=squared, memory_budget=budget)
    assert_close(got, oracle(x, y, squared), x.dtype, f"{problem}")


@backends
@PROPERTY
@given(problem=problems(), data=st.data())
def test_property_invariances(device, backend, problem, data):
    """Permuting rows, translating every point by the same vector and swapping x and y leave
    the median unchanged (to the dtype's tolerance: the centring sums differ in order)."""
    x, y, budget = drawn(problem, device)
    dtype = x.dtype
    # Dyadic coordinates and integer shifts: the translated inputs are exact, so the oracle of
    # both problems is the same number.
    x = torch.round(x * 1024) / 1024
    y = None if y is None else torch.round(y * 1024) / 1024
    expected = oracle(x, y)
    base = median(x, y, memory_budget=budget)
    assert_close(base, expected, dtype, "base")

    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    px = x[torch.randperm(x.shape[0], generator=g)]
    py = None if y is None else y[torch.randperm(y.shape[0], generator=g)]
    permuted = median(px, py, memory_budget=budget)
    assert_close(permuted, base.double(), dtype, "permuted vs base")
    assert_close(permuted, expected, dtype, "permuted")

    shift = torch.randint(-100, 101, (x.shape[1],), generator=g).to(dtype).to(device)
    tx, ty = x + shift, None if y is None else y + shift
    assert torch.equal(oracle(tx, ty), expected)
    translated = median(tx, ty, memory_budget=budget)
    assert_close(translated, base.double(), dtype, "translated vs base")
    assert_close(translated, expected, dtype, "translated")

    if y is not None:
        swapped = median(y, x, memory_budget=budget)
        assert_close(swapped, base.double(), dtype, "swapped vs base")
        assert_close(swapped, expected, dtype, "swapped")


@backends
@PROPERTY
@given(problem=problems(), k=st.integers(-90, 90))
def test_property_power_of_two_scaling_is_exact(device, backend, problem, k):
    """Multiplying every input by 2**k multiplies the result by 2**k exactly (2**2k squared),
    as long as inputs and result stay normal numbers: scaling by a power of two changes no
    rounding, so no overflow/underflow of internal norms may show."""
    x, y, budget = drawn(problem, device)
    dtype = x.dtype
    sx, sy = x * 2.0**k, None if y is None else y * 2.0**k
    got = median(sx, sy, memory_budget=budget)
    assert_exact(got, (median(x, y, memory_budget=budget).double() * 2.0**k).to(dtype), f"k={k}")
    if abs(k) <= 50:  # 2**2k times a squared distance stays normal in float32
        got = median(sx, sy, squared=True, memory_budget=budget)
        base = median(x, y, squared=True, memory_budget=budget)
        assert_exact(got, (base.double() * 2.0 ** (2 * k)).to(dtype), f"squared k={k}")


# --------------------------------------------------------------------------------------------
# Bad inputs


def _t(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


BAD_INPUTS = [
    ("x list", lambda: median([[0.0, 1.0], [2.0, 3.0]]), TypeError, r"^x must be a torch\.Tensor"),
    ("x int", lambda: median(torch.arange(6).reshape(3, 2)), TypeError, r"^x must have a floating"),
    ("x bool", lambda: median(_t(3, 2, dtype=torch.bool)), TypeError, r"^x must have a floating"),
    ("y list", lambda: median(_t(3, 2), [[0.0, 1.0]]), TypeError, r"^y must be a torch\.Tensor"),
    ("y int", lambda: median(_t(3, 2), _t(3, 2, dtype=torch.int32)), TypeError, r"^y must have"),
    (
        "y f64 vs x f32",
        lambda: median(_t(3, 2), _t(3, 2, dtype=torch.float64)),
        TypeError,
        r"^y has dtype torch\.float64, expected torch\.float32",
    ),
    (
        "y f32 vs x f16",
        lambda: median(_t(3, 2, dtype=torch.float16), _t(3, 2)),
        TypeError,
        r"^y has dtype",
    ),
    ("y feature shape", lambda: median(_t(3, 2), _t(4, 3)), ValueError, r"^y must have shape"),
    ("y feature rank", lambda: median(_t(3, 2), _t(4, 1, 2)), ValueError, r"^y must have shape"),
    ("y images", lambda: median(_t(3, 2, 2), _t(4, 4)), ValueError, r"^y must have shape"),
    (
        "y batch",
        lambda: median(_t(2, 3, 2), _t(3, 3, 2), batched=True),
        ValueError,
        r"^y must have shape \(B=2",
    ),
    ("N=1", lambda: median(_t(1, 3)), ValueError, r"^x must hold at least 2 samples"),
    ("N=0", lambda: median(_t(0, 3)), ValueError, r"^x must hold at least 2 samples"),
    (
        "N=1 batched",
        lambda: median(_t(2, 1, 3), batched=True),
        ValueError,
        r"^x must hold at least 2 samples",
    ),
    ("N=1 (N,)", lambda: median(_t(1)), ValueError, r"^x must hold at least 2 samples"),
    (
        "empty x cross",
        lambda: median(_t(0, 3), _t(2, 3)),
        ValueError,
        r"^x and y must each hold at least 1 sample, got N = 0",
    ),
    (
        "empty y cross",
        lambda: median(_t(2, 3), _t(0, 3)),
        ValueError,
        r"^x and y must each hold at least 1 sample, got N = 2, M = 0",
    ),
    (
        "empty y batched",
        lambda: median(_t(2, 3, 3), _t(2, 0, 3), batched=True),
        ValueError,
        r"^x and y must each hold",
    ),
    ("x 0-d", lambda: median(torch.tensor(1.0)), ValueError, r"^x must have shape \(N, \*feat\)"),
    (
        "x 1-d batched",
        lambda: median(_t(5), batched=True),
        ValueError,
        r"^x must have shape \(B, N, \*feat\)",
    ),
    (
        "x 0-d batched",
        lambda: median(torch.tensor(1.0), batched=True),
        ValueError,
        r"^x must have shape \(B, N",
    ),
    (
        "budget 0",
        lambda: median(_t(3, 2), memory_budget=0),
        ValueError,
        r"^memory_budget must be (a )?positive",
    ),
    (
        "budget < 0",
        lambda: median(_t(3, 2), memory_budget=-1),
        ValueError,
        r"^memory_budget must be (a )?positive",
    ),
    (
        "budget float",
        lambda: median(_t(3, 2), memory_budget=1e6),
        TypeError,
        r"^memory_budget must be an int",
    ),
    (
        "budget bool",
        lambda: median(_t(3, 2), memory_budget=True),
        TypeError,
        r"^memory_budget must be an int",
    ),
    (
        "budget tensor",
        lambda: median(_t(3, 2), memory_budget=torch.tensor(10**6)),
        TypeError,
        r"^memory_budget must be an int",
    ),
]


# Rejected by the input checks of median_pairwise_distance, before any backend is chosen
# (raises_before_dispatch fails otherwise): one test per case, not one per backend.
@pytest.mark.parametrize(
    "call, error, match", [p[1:] for p in BAD_INPUTS], ids=[p[0] for p in BAD_INPUTS]
)
def test_bad_input_raises(call, error, match):
    with raises_before_dispatch(error, match=match):
        call()


# --------------------------------------------------------------------------------------------
# Memory, measured in a fresh process (peak RSS on CPU, the allocator's peak on CUDA)

_MEASURE = textwrap.dedent(
    """
    import json, math, sys, time
    import torch
    import nats_kernels as nk

    device, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    budget = None if sys.argv[4] == "default" else int(sys.argv[4])
    dtype = getattr(torch, sys.argv[5])
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0)).to(dtype).to(device)
    nk.median_pairwise_distance(x[:64])  # first call: dispatch, lazy imports

    def rss(field):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

    if device == "cpu":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size (VmHWM) to the current one
        base = rss("VmRSS")
    else:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    r = nk.median_pairwise_distance(x, memory_budget=budget).item()
    seconds = time.perf_counter() - t0
    peak = rss("VmHWM") if device == "cpu" else torch.cuda.max_memory_allocated()
    print(json.dumps({"result": r, "seconds": seconds, "extra": peak - base,
                      "x_bytes": x.numel() * x.element_size()}))
    """
)


def measure(device, n, d, budget, dtype="float32", live_only=False):
    """Run one call in a fresh process; returns its result, time and peak extra memory. With
    ``live_only`` every heap block of 64 KiB or more is its own mapping (glibc
    M_MMAP_THRESHOLD), returned to the system when freed, so the peak RSS counts the memory the
    op holds and not the blocks the C allocator keeps for reuse (noisy with small tiles)."""
    env = dict(os.environ)
    if live_only:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, device, str(n), str(d), str(budget), dtype],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def allowed(budget, x_bytes):
    """The budget covers tiles and kept keys. Outside it: the centred work copy of the inputs
    (up to twice x's size for half-precision inputs centred in float32), the (B, 65536) int64
    histograms with their cumulative sums, and interpreter noise."""
    return budget + 2 * x_bytes + 6 * 2**20


@backends
@pytest.mark.parametrize(
    "n, d, budget, live_only",
    [
        # default budget, 7.2e7 pairs: tiles of ~3000 x 3000 keys recomputed on each pass
        (12000, 16, "default", False),
        # 2e6 pairs, 8 MB of keys kept between passes (<= half of the budget)
        (2000, 8, 64 * 2**20, False),
        # small tiles recomputed on each pass: live memory (see measure)
        (4000, 8, 16 * 2**20, True),
    ],
    ids=["default-budget", "keep-keys", "small-tiles"],
)
def test_workspace_stays_within_budget(device, backend, n, d, budget, live_only):
    m = measure(device, n, d, budget, live_only=live_only)
    limit = allowed(nk.DEFAULT_MEMORY_BUDGET if budget == "default" else budget, m["x_bytes"])
    assert m["extra"] <= limit, (
        f"peak extra memory {m['extra'] / 2**20:.1f} MiB, allowed {limit / 2**20:.1f} MiB"
    )
    expected = math.sqrt(2 * d)
    assert abs(m["result"] - expected) < 0.05 * expected, m


@pytest.mark.slow
@backends
def test_large_problem_default_budget(device, backend):
    """N = 20000, d = 3072 float32 (2e8 pairs; the N x N float32 matrix would be 1.6 GB):
    completes, gives the ~sqrt(2d) median distance of unit normal samples, and needs no more
    than the default budget and a work copy of x."""
    n, d = 20000, 3072
    m = measure(device, n, d, "default")
    expected = math.sqrt(2 * d)  # median of |a - b| for a, b ~ N(0, I_d): sqrt(2d) (1 - O(1/d))
    assert math.isfinite(m["result"]) and abs(m["result"] - expected) < 1e-3 * expected, m
    limit = allowed(nk.DEFAULT_MEMORY_BUDGET, m["x_bytes"])
    assert m["extra"] <= limit < n * n * 4 / 2, (
        f"peak extra memory {m['extra'] / 2**20:.0f} MiB, allowed {limit / 2**20:.0f} MiB"
    )
