"""The C++ CPU kernels (csrc/cpu): that they serve the ops, their determinism across runs and
thread counts, layouts the parametrized op suites do not reach, sizes that cross the kernels'
chunk (32768 elements) and block (2048 elements) boundaries, and the median's selection paths.
Aliased and overlapping operands are tested on every backend in tests/test_aliasing.py.

The oracle here is the library's reference run on float64 copies of the (already rounded)
inputs; the per-dtype tolerance is the one table of tests/helpers.py.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from helpers import DTYPES, assert_close, cfg_oracle, make, on_reference, same_bits
from listops import doubles, tensor_list

import nats_kernels as nk
from nats_kernels import _dispatch
from nats_kernels._compat import has_kernel
from nats_kernels._dispatch import KERNEL_OPS
from nats_kernels._validate import acc_dtype

CPU_OPS = (
    "cfg_accumulate",
    "cfg_accumulate_list",
    "cfg_step_",
    "multi_dot",
    "aw_weights",
    "aw_combine_",
    "iga_ratio",
    "iga_correction_",
    "median_pairwise_distance",
)

pytestmark = pytest.mark.skipif(
    not nk.backends()["cpu"]["available"],
    reason=f"C++ extension not available: {nk.backends()['cpu']['reason']}",
)

CHUNK = 32768  # csrc/include/nk/chunk.h kChunk

# 40 tensors: tiny ones, 0-d and empty ones, chunk-straddling ones and one tensor spanning
# several chunks (5 * 32768 + 1221 elements).
MANY_SHAPES = (
    [(), (1,), (7,), (0,), (59,), (3, 5), (97, 2), (2, 0, 3)] * 4
    + [(CHUNK - 1,), (3,), (CHUNK + 1,), (331, 499), (17, 31), (1,), (), (1025, 3)]
)
assert len(MANY_SHAPES) == 40 and sum(math.prod(s) for s in MANY_SHAPES) > 7 * CHUNK


# ------------------------------------------------------------------------ the backend serves


def test_cpu_backend_serves_the_ops_by_default(monkeypatch):
    monkeypatch.delenv("NATS_KERNELS_BACKEND", raising=False)
    info = nk.backends()["cpu"]
    assert info["available"], info["reason"]
    assert set(CPU_OPS) <= set(info["ops"]), info["ops"]
    for op in CPU_OPS:
        assert op in KERNEL_OPS
        assert has_kernel(f"nats_kernels_ext::{op}", "CPU")
        assert _dispatch.backend_name(op, "cpu") == "cpu", op
        assert _dispatch.kernel(op, torch.device("cpu")) is getattr(
            torch.ops.nats_kernels_ext, op
        ).default
    # Meta tensors still go to the reference (its fake kernels).
    assert _dispatch.backend_name("multi_dot", "meta") == "reference"


# ------------------------------------------------------------------------------ determinism


def _reductions(dtype, seed=0):
    a = tensor_list(MANY_SHAPES, dtype, "cpu", seed=seed, layout="mixed", which=0)
    b = tensor_list(MANY_SHAPES, dtype, "cpu", seed=seed + 1, layout="mixed", which=1)
    real = make((3, 70001), dtype, seed=seed + 2)[:, ::2]  # 105003 logits, strided
    fake = make((211, 997), dtype, seed=seed + 3).t()  # 210367 logits, transposed

    def run():
        dots = nk.multi_dot(a, b)
        r = nk.iga_ratio(a, b)
        w = nk.aw_weights(dots, real, fake)
        w64 = nk.aw_weights(dots.double(), real, fake, normalized=False)
        return [dots, r, *w, *w64]

    return run, (a, b, real, fake)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reductions_bit_identical_across_runs_and_thread_counts(dtype, monkeypatch):
    monkeypatch.delenv("NATS_KERNELS_BACKEND", raising=False)
    run, (a, b, real, fake) = _reductions(dtype)
    torch.set_num_threads(2)
    first = run()
    second = run()
    torch.set_num_threads(1)
    single = run()
    torch.set_num_threads(2)
    for k, (x, y, z) in enumerate(zip(first, second, single)):
        assert same_bits(x, y), f"result {k} differs between two runs"
        assert same_bits(x, z), f"result {k} differs between 2 threads and 1 thread"
    # And the values are right.
    d64 = on_reference(nk.multi_dot, doubles(a), doubles(b))
    acc = acc_dtype(dtype)
    assert_close(first[0], d64, acc, "multi_dot many tensors")
    assert_close(first[1], d64[2] / (d64[0] + 1e-12), acc, "iga_ratio many tensors")
    ref = on_reference(nk.aw_weights, d64, real.double(), fake.double())
    assert int(first[4]) == int(ref[2])
    assert_close(first[2], ref[0], acc, "aw w_r")
    assert_close(first[3], ref[1], acc, "aw w_f")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dots_sum_in_float64_whatever_the_input_dtype(dtype, monkeypatch):
    """The dot kernels widen every element to float64 (exact) and form and sum the products in
    float64 (csrc/cpu/nk_cpu_dots.h), with the same lanes for every dtype and any alignment: on
    lower-precision inputs they give the float64 kernel's sums on the widened copies, rounded once.
    A product or partial sum kept in float32 would break this. Views start at every offset mod 4
    and run lengths straddle the 16-lane blocks; <gF, gF>, which iga_ratio skips, is chosen huge
    so that leaving it out must not change iga_ratio's bits."""
    monkeypatch.delenv("NATS_KERNELS_BACKEND", raising=False)
    g = torch.Generator().manual_seed(5)
    a, b = [], []
    for k, n in enumerate((15, 16, 17, 33, 1000, 4099, CHUNK + 21)):
        off = k % 4
        x = torch.randn(n + off, generator=g).to(dtype)[off:]
        # b nearly cancels against a (<a,b> small against |a||b|) and carries large values.
        y = (1e3 * torch.randn(n + off, generator=g)).to(dtype)[off:]
        y[: n // 2] = (-x[: n // 2].float() + 1e-2 * torch.randn(n // 2, generator=g)).to(dtype)
        a.append(x)
        b.append(y)
    got = nk.multi_dot(a, b)
    want = nk.multi_dot(doubles(a), doubles(b))
    assert same_bits(got, want.float()), (got, want)
    assert same_bits(nk.iga_ratio(a, b), nk.iga_ratio(doubles(a), doubles(b)).float())
    d = want
    assert same_bits(nk.iga_ratio(doubles(a), doubles(b)), d[2] / (d[0] + 1e-12))


def test_reductions_are_order_sensitive_enough_to_test():
    """Guard for the test above: float32 sums of these lists do depend on the order, so
    bit-identity across thread counts is a real property of the kernels, not a coincidence."""
    a = tensor_list(MANY_SHAPES, torch.float32, "cpu", seed=0, layout="contiguous")
    flat = torch.cat([t.flatten() for t in a]).double() ** 2
    forward, backward = flat.float().sum(), flat.flip(0).float().cumsum(0)[-1]
    assert forward != backward


# --------------------------------------------------------------------------- cfg accumulate


@pytest.mark.parametrize("dtype", DTYPES)
def test_cfg_list_noncontiguous_members(dtype, monkeypatch):
    monkeypatch.delenv("NATS_KERNELS_BACKEND", raising=False)
    shape = (6, 33, 41)  # 8118 elements: several 2048-element blocks per call
    M = 5
    x0 = make(shape, dtype, seed=1)
    base = make((M, 41, 33, 6), dtype, seed=2)
    grads = [
        base[0].permute(2, 1, 0),  # fully transposed
        make((6, 33, 82), dtype, seed=3)[..., ::2],  # strided inner dim
        make((12, 33, 41), dtype, seed=4)[::2],  # strided outer dim
        make(shape, dtype, seed=5),  # contiguous
        make((6, 1, 41), dtype, seed=6).expand(shape),  # a stride-0 dim (read only)
    ]
    assert sum(g.is_contiguous() for g in grads) == 1
    weights = nk.annealed_weights(1.0, 0.01, M)
    scale = make((M, 6), torch.float32, seed=7).sigmoid()
    out = nk.cfg_accumulate(x0, grads, weights, eta=0.5, scale=scale)
    assert_close(out, cfg_oracle(x0, grads, weights, 0.5, scale), dtype,
                 "non-contiguous list")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_cfg_rows_cross_chunks_and_blocks(dtype, layout, monkeypatch, threads):
    """Samples of 40009 elements (more than one parallel chunk, not a multiple of the block),
    per-sample scale, under the full thread pool; stacked and list forms; cfg_step_."""
    threads()
    monkeypatch.delenv("NATS_KERNELS_BACKEND", raising=False)
    M, shape = 3, (3, 233, 171)
    if layout == "contiguous":
        x0 = make(shape, dtype, seed=15)
        stacked = make((M, *shape), dtype, seed=16)
    else:
        x0 = make((3, 171, 233), dtype, seed=15).transpose(1, 2)
        stacked = make((M, 3, 171, 233), dtype, seed=16).transpose(2, 3)
    weights = make((M,), torch.float32, seed=17)
    scale = make((M, 3), torch.float64, seed=18)
    expected = cfg_oracle(x0, list(stacked), weights, 1.5, scale)
    assert_close(nk.cfg_accumulate(x0, stacked, weights, eta=1.5, scale=scale), expected,
                 dtype, "stacked")
    assert_close(nk.cfg_accumulate(x0, list(stacked), weights, eta=1.5, scale=scale), expected,
                 dtype, "list")
    x = x0.clone() if layout == "contiguous" else x0.clone().transpose(1, 2).contiguous() \
        .transpose(1, 2)
    nk.cfg_step_(x, stacked[1], weights[1], eta=1.5, scale=scale[1])
    step = on_reference(nk.cfg_step_, x0.double().clone(), stacked[1].double(),
                        weights[1].double(), eta=1.5, scale=scale[1].double())
    assert_close(x, step, dtype, "cfg_step_")


def test_cfg_empty_batch_with_scale():
    x0 = torch.empty(0, 5)
    out = nk.cfg_accumulate(x0, torch.empty(2, 0, 5), torch.ones(2), scale=torch.ones(2, 0))
    assert out.shape == (0, 5)


# ------------------------------------------------------------------------ list ops: chunks


@pytest.mark.parametrize("dtype", DTYPES)
def test_list_ops_many_tensors_match_reference(dtype, monkeypatch, threads):
    """The 40-tensor list (chunks spanning several tensors, a tensor spanning several chunks),
    mixed layouts, full thread pool: every position written right, and nothing else."""
    threads()
    monkeypatch.delenv("NATS_KERNELS_BACKEND", raising=False)
    g_r = tensor_list(MANY_SHAPES, dtype, "cpu", seed=30, layout="mixed", which=0)
    g_f = tensor_list(MANY_SHAPES, dtype, "cpu", seed=31, layout="mixed", which=1)
    out = tensor_list(MANY_SHAPES, dtype, "cpu", seed=32, layout="mixed", which=2)
    w_r = torch.tensor(0.625)
    expected = [0.625 * r - 1.5 * f for r, f in zip(doubles(g_r), doubles(g_f))]
    nk.aw_combine_(out, g_r, g_f, w_r, -1.5)
    for p, (o, e) in enumerate(zip(out, expected)):
        assert_close(o, e, dtype, f"aw_combine_ out[{p}]")
    expected = [x - 0.8 * y for x, y in zip(doubles(g_r), doubles(g_f))]
    nk.iga_correction_(g_r, g_f, torch.tensor(0.8, dtype=torch.float64))
    for p, (o, e) in enumerate(zip(g_r, expected)):
        assert_close(o, e, dtype, f"iga_correction_ g[{p}]")


@pytest.mark.parametrize("chunks", [1, 2, 3, 4, 5])
def test_list_ops_around_the_parallel_grain(chunks, monkeypatch):
    """Lists of 1-5 chunks of 32768 elements (plus one element): the list kernels go parallel
    only with two chunks per thread (design §8.1), so these sizes cross that boundary. Results
    are bit-identical with 1 and 2 threads, and right."""
    monkeypatch.delenv("NATS_KERNELS_BACKEND", raising=False)
    total = chunks * 32768 + 1
    sizes = [total // 4, total // 4, total - 2 * (total // 4)]
    gen = torch.Generator().manual_seed(chunks)
    a = [torch.randn(n, generator=gen) for n in sizes]
    b = [torch.randn(n, generator=gen) for n in sizes]
    results = []
    for n_threads in (2, 1):
        torch.set_num_threads(n_threads)
        out = [t.clone() for t in a]
        nk.iga_correction_(out, b, torch.tensor(0.375))
        results.append((nk.multi_dot(a, b), out))
    torch.set_num_threads(2)
    (d2, o2), (d1, o1) = results
    assert same_bits(d2, d1)
    for x, y in zip(o2, o1):
        assert same_bits(x, y)
    assert_close(d2, on_reference(nk.multi_dot, doubles(a), doubles(b)), torch.float32, "dots")
    for p, (o, x, y) in enumerate(zip(o2, doubles(a), doubles(b))):
        assert_close(o, x - 0.375 * y, torch.float32, f"iga_correction_ g[{p}]")


@pytest.mark.parametrize("dtype", DTYPES)
def test_aw_weights_large_logits_match_reference(dtype, monkeypatch):
    """Sigmoid means over logits spanning several chunks, in every logits dtype."""
    monkeypatch.delenv("NATS_KERNELS_BACKEND", raising=False)
    real = (make((5 * CHUNK + 17,), dtype, seed=40) + 2.5).to(dtype)
    fake = make((2, 3 * CHUNK + 1), dtype, seed=41)[:, ::3]
    for d in ((2.7, 0.9, -0.8), (1.3, 0.45, 0.6)):
        for dots_dtype in DTYPES:
            dots = torch.tensor(d, dtype=dots_dtype)
            got = nk.aw_weights(dots, real, fake)
            ref = on_reference(nk.aw_weights, dots.double(), real.double(), fake.double())
            assert int(got[2]) == int(ref[2]) == 3 + (d[2] > 0)
            assert got[0].dtype == got[1].dtype == dots_dtype
            assert_close(got[0], ref[0], dots_dtype, "w_r")
            assert_close(got[1], ref[1], dots_dtype, "w_f")


# ------------------------------------------------------------------------------ median paths
# csrc/cpu/median_cpu.cpp selects by a window pass (keys between two sampled bounds are kept and
# the rank is found among them) or, when the window cannot hold the rank or the budget, by radix
# passes over recomputed tiles; a problem whose pairs fit one tile takes the small path instead
# (tests/test_median.py checks its bits against the tiled path's). median_path_counts() says
# which path each problem took.


def path_counts() -> list[int]:
    return torch.ops.nats_kernels_ext.median_path_counts().tolist()


def ran_paths(fn):
    """(result, [window problems, radix problems, small-path problems]) of one call."""
    before = path_counts()
    out = fn()
    return out, [a - b for a, b in zip(path_counts(), before)]


@contextlib.contextmanager
def tiled_only():
    """No small path (its limit 0) inside the block: small problems take the tiled path."""
    limit = torch.ops.nats_kernels_ext.median_small_limit
    old = limit(0)
    try:
        yield
    finally:
        limit(old)


def lattice_points(n: int, d: int, r: int, dtype, seed: int) -> torch.Tensor:
    """n (even) points with integer coordinates in [-r, r], closed under negation so that their
    mean is exactly 0 (the kernel centres its inputs): every squared distance, norm and dot
    product is a small integer, computed exactly by the GEMM form and the direct form alike, so
    any selection error shows."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(-r, r + 1, (n // 2, d), generator=g)
    x = torch.cat([p, -p])
    return x[torch.randperm(n, generator=g)].to(dtype)


def exact_sq_median(x: torch.Tensor, y: torch.Tensor | None = None) -> float:
    x64 = x.double()
    if y is None:
        i, j = torch.triu_indices(x.shape[0], x.shape[0], 1)
        sq = ((x64[i] - x64[j]) ** 2).sum(-1)
    else:
        sq = torch.cdist(x64, y.double()).square().round().flatten()
    return sq.kthvalue((sq.numel() - 1) // 2 + 1).values.item()


@pytest.mark.parametrize("d", [3, 40])  # the direct form (d <= 16) and the GEMM form
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_median_paths_agree_exactly(d, dtype, monkeypatch, threads):
    """The same exact squared median from the small path and the kept-all window (small
    problem), the sampled window (default budget), and radix passes (a budget too small for the
    window), with one thread and with the pool; each path is checked to have run."""
    monkeypatch.setenv("NATS_KERNELS_BACKEND", "cpu")
    x = lattice_points(1100, d, 6, dtype, seed=d)  # 604450 pairs: more than the kept-all 2^18
    want = exact_sq_median(x)
    small = lattice_points(300, d, 6, dtype, seed=d + 2)  # 44850 pairs: all kept
    for n_threads in (1, torch.get_num_threads()):
        torch.set_num_threads(n_threads)
        got, paths = ran_paths(lambda: nk.median_pairwise_distance(small, squared=True))
        assert got.item() == exact_sq_median(small) and paths == [0, 0, 1], (got, paths)
        with tiled_only():
            got, paths = ran_paths(lambda: nk.median_pairwise_distance(small, squared=True))
        assert got.item() == exact_sq_median(small) and paths == [1, 0, 0], (got, paths)
        got, paths = ran_paths(lambda: nk.median_pairwise_distance(x, squared=True))
        assert got.item() == want and paths == [1, 0, 0], (n_threads, got, paths)
        got, paths = ran_paths(
            lambda: nk.median_pairwise_distance(x, squared=True, memory_budget=50_000))
        assert got.item() == want and paths == [0, 1, 0], (n_threads, got, paths)
        threads()
    y = lattice_points(700, d, 6, dtype, seed=d + 1)  # cross: 770000 pairs, mean of both 0
    got, paths = ran_paths(lambda: nk.median_pairwise_distance(x, y, squared=True))
    assert got.item() == exact_sq_median(x, y) and paths == [1, 0, 0], (got, paths)


@pytest.mark.parametrize("d", [3, 40])
def test_median_bit_identical_across_thread_counts(d, monkeypatch, threads):
    """Random float32 data, where the tile shape decides the rounding: the same bits with one
    thread and with the pool (tiles depend on the budget only), on both selection paths."""
    monkeypatch.setenv("NATS_KERNELS_BACKEND", "cpu")
    x = make((1500, d), torch.float32, seed=7)
    xb = make((3, 200, d), torch.float32, seed=8)
    runs = []
    for n_threads in (1, torch.get_num_threads()):
        torch.set_num_threads(n_threads)
        runs.append([
            nk.median_pairwise_distance(x),
            nk.median_pairwise_distance(x, memory_budget=100_000),
            nk.median_pairwise_distance(xb, batched=True),
            nk.median_pairwise_distance(x, xb[0]),
        ])
        threads()
    for a, b in zip(*runs):
        assert same_bits(a, b), (a, b)


@pytest.mark.parametrize("d", [3, 40])  # the direct form (d <= 16) and the GEMM form
@pytest.mark.parametrize("cross", [False, True], ids=["pairwise", "cross"])
def test_median_small_problems_in_parallel(d, cross, monkeypatch, threads):
    """A batch of small problems (every key kept) runs one problem per thread under a pool of 2
    threads (median_cpu.cpp's by_problem), problem after problem with 1 thread, and a problem
    alone (B = 1) never by problem: all three give each problem the same bits. Random float32
    data, where the tile shape decides the rounding: one tile per problem (default budget) and
    dozens (a 100 kB budget: 19 x 19 tiles, diagonal ones included); each problem scaled
    differently and one of them NaN, so that a result written to another problem's slot or
    state shared between the threads shows. Lattice data: each result is the exact squared
    median (one of the computed distances, the lower one of an even count). The tiled path
    throughout (these one-tile problems would take the small path: tests/test_median.py)."""
    monkeypatch.setenv("NATS_KERNELS_BACKEND", "cpu")
    with tiled_only():
        _small_problems_in_parallel(d, cross, threads)


def _small_problems_in_parallel(d, cross, threads):
    batch, n, m = 6, 120, 90  # 7140 (10800) pairs per problem: kept whole even at 100 kB
    scale = torch.arange(1, batch + 1, dtype=torch.float32).view(batch, 1, 1)
    x = make((batch, n, d), torch.float32, seed=31) * scale
    x[3, 17, 1] = math.nan
    y = make((batch, m, d), torch.float32, seed=32) * scale if cross else None
    lat_x = torch.stack([lattice_points(n, d, 6, torch.float32, seed=40 + i) for i in range(batch)])
    lat_y = (torch.stack([lattice_points(m, d, 6, torch.float32, seed=50 + i)
                          for i in range(batch)]) if cross else None)
    want = [exact_sq_median(lat_x[i], None if lat_y is None else lat_y[i]) for i in range(batch)]

    def alone(fn, xs, ys):
        return torch.stack([fn(xs[i], None if ys is None else ys[i]) for i in range(batch)])

    runs = []
    for n_threads in (1, 2):
        torch.set_num_threads(n_threads)
        run = []
        for budget in (None, 100_000):
            got, paths = ran_paths(lambda budget=budget: nk.median_pairwise_distance(
                x, y, batched=True, memory_budget=budget))
            assert paths == [batch - 1, 0, 0], (n_threads, budget, paths)  # NaN one: no path
            assert torch.isnan(got[3]) and not torch.isnan(got[torch.arange(batch) != 3]).any()
            single = alone(lambda a, b, budget=budget: nk.median_pairwise_distance(
                a, b, memory_budget=budget), x, y)
            assert same_bits(got, single), (n_threads, budget, got, single)
            run.append(got)
            got = nk.median_pairwise_distance(lat_x, lat_y, batched=True, squared=True,
                                              memory_budget=budget)
            assert got.tolist() == want, (n_threads, budget, got, want)
        runs.append(run)
    torch.set_num_threads(1)
    # Unbatched with 1 thread: the path the batched one replaces, problem by problem.
    reference = alone(lambda a, b: nk.median_pairwise_distance(a, b), x, y)
    for a, b in zip(*runs):
        assert same_bits(a, b), (a, b)
    assert same_bits(runs[1][0], reference)
    threads()


@pytest.mark.slow
def test_median_more_than_2_31_pairs(monkeypatch):
    """65537 points 0, 1, ..., 65536 on a line: 2,147,516,416 pairs (> 2^31), distances |i - j|
    with multiplicity N - |i - j|, so the lower median is known in closed form. float64 keeps
    every squared distance exact; the 1 GiB budget lets the one window pass hold its keys."""
    monkeypatch.setenv("NATS_KERNELS_BACKEND", "cpu")
    n = 65537
    n_pairs = n * (n - 1) // 2
    assert n_pairs > 2**31
    k = (n_pairs - 1) // 2
    # smallest t with #{pairs at distance <= t} = t*n - t(t+1)/2 > k
    lo, hi = 1, n - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if mid * n - mid * (mid + 1) // 2 > k:
            hi = mid
        else:
            lo = mid + 1
    x = torch.arange(n, dtype=torch.float64)[:, None]
    got, paths = ran_paths(
        lambda: nk.median_pairwise_distance(x, squared=True, memory_budget=2**30))
    assert got.item() == float(lo * lo) and paths == [1, 0, 0], (got, lo, paths)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_scale", [False, True])
def test_cfg_step_contiguous_path_matches_the_block_path(dtype, with_scale, monkeypatch):
    """cfg_step_ on contiguous x and grad goes straight over memory; strided ones go through the
    accumulator block of cfg_accumulate. Both do the same operations in the same order: the
    results must be bit-identical (and the in-place update of a strided view correct)."""
    monkeypatch.setenv("NATS_KERNELS_BACKEND", "cpu")
    B, d = 59, 1025
    x = make((B, d), dtype, "cpu", seed=1)
    g = make((B, d), dtype, "cpu", seed=2)
    scale = torch.rand(B, generator=torch.Generator().manual_seed(3)) if with_scale else None
    weight = torch.tensor(0.37, dtype=torch.float64)
    x_strided = torch.empty(B, 2 * d, dtype=dtype)[:, ::2]
    x_strided.copy_(x)
    g_strided = torch.empty(B, 2 * d, dtype=dtype)[:, 1::2]
    g_strided.copy_(g)
    nk.cfg_step_(x, g, weight, eta=0.3, scale=scale)
    nk.cfg_step_(x_strided, g_strided, weight, eta=0.3, scale=scale)
    assert same_bits(x, x_strided.contiguous())
    ref = on_reference(nk.cfg_step_, make((B, d), dtype, "cpu", seed=1).double(), g.double(),
                       weight, eta=0.3, scale=None if scale is None else scale.double())
    assert_close(x, ref, dtype, "cfg_step_")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("form", ["stacked", "list"])
def test_cfg_accumulate_contiguous_path_matches_the_block_path(dtype, with_scale, form,
                                                               monkeypatch):
    """cfg_accumulate on contiguous inputs runs a raw-pointer loop; strided ones the layout-aware
    block loop. Same additions in the same order (M = 7: a group of four, then three singles):
    bit-identical results, across chunk (32768), block and row boundaries."""
    monkeypatch.setenv("NATS_KERNELS_BACKEND", "cpu")
    M, B, d = 7, 59, 1025
    x0 = make((B, d), dtype, "cpu", seed=1)
    grads = torch.stack([make((B, d), dtype, "cpu", seed=10 + m) for m in range(M)])
    weights = torch.rand(M, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    scale = torch.rand(M, B, generator=torch.Generator().manual_seed(3)) if with_scale else None
    strided = [torch.empty(B, 2 * d, dtype=dtype)[:, ::2].copy_(g) for g in grads]
    assert all(torch.equal(s, g) and not s.is_contiguous() for s, g in zip(strided, grads))
    flat = nk.cfg_accumulate(x0, grads if form == "stacked" else list(grads), weights,
                             eta=0.3, scale=scale)
    block = nk.cfg_accumulate(x0, strided, weights, eta=0.3, scale=scale)
    assert same_bits(flat, block)
    ref = cfg_oracle(x0, list(grads), weights, 0.3, scale)
    assert_close(flat, ref, dtype, "cfg_accumulate")
