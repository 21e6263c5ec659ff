"""``nats_kernels.distributed.median_pairwise_distance``: the exact median over the union of the
shards of several processes (gloo process groups on localhost, see tests/ranks.py).

Each world size spawns its processes once: one module-level worker runs every case of that world
and returns the results (and the errors each rank raised), which the tests below compare with the
single-process op on the concatenated shards: bit for bit against the reference backend (the
same tiles computed by the same torch ops), within the tolerance table against the default
backend, and bit for bit against it on exactly representable (lattice) data.
"""

from __future__ import annotations

import datetime
import math
import re

import pytest
import ranks
import torch
import torch.distributed as dist
from helpers import assert_close, make
from test_median import assert_matches, lattice

import nats_kernels as nk
from nats_kernels.distributed import median_pairwise_distance as dmedian
from nats_kernels.reference import median as refmedian

# The ranks run single-threaded (tests/ranks.py); so does the single-process op they are
# compared with.
pytestmark = pytest.mark.single_thread

TINY = 2000  # bytes: tiles of 8 x 8 (float32) or 7 x 7 (float64) keys, recomputed every pass


# --------------------------------------------------------------------------------------------
# The cases: the full (concatenated) inputs are built identically in the ranks and in the test


def case(name, dtype, xs, ys=None, feat=(7,), budget=None, kind="normal", seed=0, grad=False):
    """xs / ys: shard sizes by rank (ys None: pairwise); grad: x requires grad."""
    return dict(name=name, dtype=dtype, xs=xs, ys=ys, feat=feat, budget=budget, kind=kind,
                seed=seed, grad=grad)


def full(c):
    """The concatenated x and y of a case."""
    n = sum(c["xs"])
    if c["kind"] == "lattice":
        # 2k + 1 integer points closed under negation: every distance exact in every dtype.
        x = lattice(n // 2, c["feat"][0], 5, c["dtype"], "cpu", seed=c["seed"], zeros=n % 2)
    else:
        x = make((n, *c["feat"]), c["dtype"], seed=c["seed"])
        if c["kind"] == "nan":
            x[n - 1].view(-1)[0] = math.nan
    y = None
    if c["ys"] is not None:
        y = make((sum(c["ys"]), *c["feat"]), c["dtype"], seed=c["seed"] + 1, scale=1.5)
    return x, y


def shard(t, sizes, rank):
    if t is None:
        return None
    start = sum(sizes[:rank])
    return t[start : start + sizes[rank]].clone()


f32, f64 = torch.float32, torch.float64

CASES = {
    2: [
        case("f32 pairwise 1+59, x requires grad", f32, (1, 59), seed=1, grad=True),
        case("f64 pairwise 7+59 tiny budget", f64, (7, 59), budget=TINY, seed=2),
        case("f32 pairwise 59+7 tiny budget", f32, (59, 7), budget=TINY, seed=3),
        case("f32 cross, empty x shard", f32, (7, 0), (3, 12), budget=TINY, seed=4),
        case("f64 cross, empty y shard", f64, (0, 5), (9, 0), seed=5),
        case("f16 pairwise, image features", torch.float16, (5, 6), feat=(3, 2), seed=6),
        case("f64 pairwise (N,) shards", f64, (4, 9), feat=(), seed=7),
        case("f32 lattice", f32, (20, 39), feat=(5,), kind="lattice", seed=8),
        case("f32 lattice tiny budget", f32, (33, 26), feat=(3,), budget=TINY, kind="lattice",
             seed=9),
        case("f64 lattice", f64, (0, 45), feat=(7,), kind="lattice", seed=10),
        case("f32 NaN on rank 1", f32, (4, 5), seed=11, kind="nan"),
    ],
    3: [
        case("f32 pairwise 1+7+59", f32, (1, 7, 59), seed=21),
        case("f32 pairwise 1+7+59 tiny budget", f32, (1, 7, 59), budget=TINY, seed=21),
        case("f64 pairwise empty middle shard", f64, (30, 0, 11), budget=TINY, seed=22),
        case("f64 cross tiny budget", f64, (1, 7, 59), (0, 4, 9), budget=TINY, seed=23),
        case("f32 cross single rows", f32, (1, 0, 0), (0, 0, 1), seed=24),
        case("f64 lattice tiny budget", f64, (17, 1, 25), feat=(4,), budget=TINY,
             kind="lattice", seed=25),
    ],
}

# The same problems in both worlds (same totals, seeds), split differently.
TILE_CASES = {
    world: {
        "recompute": case("tiles recompute", f32, xs, budget=TINY, seed=31),
        # Thin cross problem: 16 tiles of 5 x 5 whose keys all fit in half the budget.
        "keep": case("tiles keep", f32, kx, ky, budget=TINY, seed=32),
    }
    for world, xs, kx, ky in [
        (2, (8, 59), (2, 4), (33, 7)), (3, (1, 7, 59), (2, 0, 4), (13, 20, 7))
    ]
}
SUBGROUP = [case("subgroup f32", f32, (9, 14), (5, 3), budget=TINY, seed=41)]

# Rejected inputs, by rank (x shard, y shard, keyword arguments), for 2 or 3 ranks; every rank
# must raise.
BAD = {
    "N < 2 over all ranks": (lambda r: (torch.zeros(int(r == 0), 3), None, {}), ValueError,
                             r"at least 2 samples over all ranks"),
    "empty y union": (lambda r: (torch.zeros(2, 3), torch.zeros(0, 3), {}), ValueError,
                      r"x and y must each hold at least 1 sample over all ranks"),
    "feature mismatch": (lambda r: (torch.zeros(3, 5 if r == 1 else 4), None, {}), ValueError,
                         r"same feature shape on every rank"),
    "same numel, other shape": (lambda r: (torch.zeros(3, *((2, 3) if r else (3, 2))), None, {}),
                                ValueError, r"same feature shape on every rank"),
    "dtype mismatch": (lambda r: (torch.zeros(3, 2, dtype=f64 if r == 1 else f32), None, {}),
                       TypeError, r"same dtype on every rank"),
    "y on rank 0 only": (lambda r: (torch.zeros(3, 2), torch.zeros(2, 2) if r == 0 else None, {}),
                         ValueError, r"y must be given on every rank or on none"),
    "squared not a bool": (lambda r: (torch.zeros(3, 2), None, {"squared": "yes"}), TypeError,
                           r"squared must be a bool"),
    "budget 0": (lambda r: (torch.zeros(3, 2), None, {"memory_budget": 0}), ValueError,
                 r"memory_budget must be a positive"),
    # Settings that are fine on each rank but differ between them (the tile plan is shared).
    "budget differs": (lambda r: (torch.zeros(9, 2), None, {"memory_budget": 4096 << r}),
                       ValueError, r"memory_budget must be the same on every rank"),
    "squared differs": (lambda r: (torch.zeros(9, 2), None, {"squared": r == 1}), ValueError,
                        r"squared must be the same on every rank"),
    # Rank 1 only: its own check fails, rank 0 raises the same type naming rank 1.
    "x a list on rank 1": (lambda r: ([[0.0, 1.0]] if r else torch.zeros(3, 2), None, {}),
                           TypeError, r"x must be a torch\.Tensor|rank 1 of the group rejected"),
    "y shape on rank 1": (lambda r: (torch.zeros(3, 2), torch.zeros(2, 3 if r == 1 else 2), {}),
                          ValueError, r"y must have shape \(M, 2\)|rank 1 of the group rejected"),
}


# --------------------------------------------------------------------------------------------
# The workers (run in the spawned ranks)


def run_cases(rank, world, cases, group=None):
    out = {}
    for c in cases:
        x, y = full(c)
        xr, yr = shard(x, c["xs"], rank), shard(y, c["ys"], rank)
        xr.requires_grad_(c["grad"])
        for squared in (False, True):
            value = dmedian(xr, yr, squared=squared, group=group, memory_budget=c["budget"])
            assert not value.requires_grad  # not differentiable: a plain result
            out[c["name"], squared] = value
    return out


def record_tiles(rank, world, c):
    """Run a case with the tile evaluation of the reference recorded: the tiles this rank
    evaluated, one entry per evaluation."""
    seen = []
    real = refmedian._tile_keys

    def spy(a, b, norm_a, norm_b, i0, i1, j0, j1, key_dtype):
        seen.append((i0, i1, j0, j1))
        return real(a, b, norm_a, norm_b, i0, i1, j0, j1, key_dtype)

    refmedian._tile_keys = spy
    try:
        x, y = full(c)
        dmedian(shard(x, c["xs"], rank), shard(y, c["ys"], rank), memory_budget=c["budget"])
    finally:
        refmedian._tile_keys = real
    return seen


def bad_inputs(rank):
    errors = {}
    for name, (make_args, _, _) in BAD.items():
        x, y, kwargs = make_args(rank)
        try:
            dmedian(x, y, **kwargs)
        except Exception as e:  # returned to the test, which checks the type
            errors[name] = (type(e), str(e))
        else:
            errors[name] = None
    return errors


def worker(rank, world):
    """Every case of a world: results, errors (by case), tiles evaluated, a subgroup."""
    out = {"results": run_cases(rank, world, CASES[world]), "errors": bad_inputs(rank)}
    # The group is still in step after the errors: a good case once more.
    out["after errors"] = run_cases(rank, world, CASES[world][:1])
    out["tiles"] = {name: record_tiles(rank, world, c) for name, c in TILE_CASES[world].items()}
    if world == 3:
        # A subgroup of ranks 0 and 2 (new_group is collective over the whole world).
        sub = dist.new_group([0, 2])
        if rank != 1:
            out["subgroup"] = run_cases([0, 2].index(rank), 2, SUBGROUP, group=sub)
            dist.barrier(group=sub)
    return out


@pytest.fixture(scope="module")
def world2():
    return ranks.run(worker, 2)


@pytest.fixture(scope="module")
def world3():
    return ranks.run(worker, 3)


# --------------------------------------------------------------------------------------------
# Helpers of the tests


def single(c, squared, backend, monkeypatch):
    x, y = full(c)
    if backend is None:
        monkeypatch.delenv("NATS_KERNELS_BACKEND", raising=False)
    else:
        monkeypatch.setenv("NATS_KERNELS_BACKEND", backend)
    return nk.median_pairwise_distance(x, y, squared=squared, memory_budget=c["budget"])


def results(out, key="results"):
    """The per-rank results, checked to be the same on every rank, bit for bit."""
    first = out[0][key]
    for r, o in enumerate(out[1:], 1):
        for k, val in o[key].items():
            assert val.shape == () and val.dtype == first[k].dtype, (k, r)
            assert torch.equal(val, first[k]) or (val.isnan() and first[k].isnan()), (k, r)
    return first


def check_against_reference(out, cases, monkeypatch, key="results"):
    got = results(out, key)
    for c in cases:
        for squared in (False, True):
            want = single(c, squared, "reference", monkeypatch)
            have = got[c["name"], squared]
            assert have.dtype == c["dtype"], c["name"]
            if c["kind"] == "nan":
                assert have.isnan() and want.isnan(), c["name"]
            else:
                assert torch.equal(have, want), (c["name"], squared, have.item(), want.item())


def check_against_default(out, cases, monkeypatch):
    got = results(out)
    for c in cases:
        for squared in (False, True):
            want = single(c, squared, None, monkeypatch)
            have = got[c["name"], squared]
            what = f"{c['name']} squared={squared}"
            if c["kind"] == "lattice":
                # Exactly representable data: the squared median is the same bits as the
                # default backend's, the distance within the one ulp square roots may differ.
                assert_matches(have, want, squared, what)
            else:
                assert_close(have, want, c["dtype"], what)


def check_tiles(out, world, monkeypatch):
    monkeypatch.setenv("NATS_KERNELS_BACKEND", "reference")
    for name, c in TILE_CASES[world].items():
        n, m = sum(c["xs"]), None if c["ys"] is None else sum(c["ys"])
        plan = refmedian.tile_plan(1, n, n if m is None else m, m is None, c["dtype"],
                                   c["budget"])
        blocks = [b[:4] for b in plan.blocks]
        assert len(blocks) >= 2 * world, (name, len(blocks))  # enough tiles to split
        passes = 32 // 16 if c["dtype"] == f32 else 64 // 16
        per_rank = [o["tiles"][name] for o in out]
        owned = [sorted(set(seen)) for seen in per_rank]
        # Every tile of the plan evaluated by exactly one rank, and the ranks' shares even.
        assert sorted(t for own in owned for t in own) == sorted(blocks), name
        assert max(len(own) for own in owned) == -(-len(blocks) // world), name
        # Kept keys: each tile evaluated once; else once per radix pass.
        assert plan.keys_fit == (name == "keep")
        for seen, own in zip(per_rank, owned):
            assert len(seen) == len(own) * (1 if plan.keys_fit else passes), name


# --------------------------------------------------------------------------------------------
# Two ranks


def test_world2_bit_identical_to_reference(world2, monkeypatch):
    check_against_reference(world2, CASES[2], monkeypatch)
    check_against_reference(world2, CASES[2][:1], monkeypatch, key="after errors")


def test_world2_close_to_default_backend(world2, monkeypatch):
    check_against_default(world2, CASES[2], monkeypatch)


def check_errors(out):
    for name, (_, error, match) in BAD.items():
        for r, o in enumerate(out):
            raised = o["errors"][name]
            assert raised is not None, f"{name}: rank {r} did not raise"
            kind, message = raised
            assert kind is error, f"{name}: rank {r} raised {kind.__name__}: {message}"
            assert re.search(match, message), f"{name}: rank {r}: {message}"


def test_world2_errors_raised_on_every_rank(world2):
    check_errors(world2)


def test_world2_tiles_split(world2, monkeypatch):
    check_tiles(world2, 2, monkeypatch)


# --------------------------------------------------------------------------------------------
# Three ranks


def test_world3_bit_identical_to_reference(world3, monkeypatch):
    check_against_reference(world3, CASES[3], monkeypatch)


def test_world3_close_to_default_backend(world3, monkeypatch):
    check_against_default(world3, CASES[3], monkeypatch)


def test_world3_errors_raised_on_every_rank(world3):
    check_errors(world3)


def test_world3_tiles_split_and_work_falls(world2, world3, monkeypatch):
    check_tiles(world3, 3, monkeypatch)
    for name in TILE_CASES[3]:
        most = [max(len(o["tiles"][name]) for o in out) for out in (world2, world3)]
        assert most[1] < most[0], (name, most)


def test_world3_subgroup(world3, monkeypatch):
    assert "subgroup" not in world3[1]
    check_against_reference([world3[0], world3[2]], SUBGROUP, monkeypatch, key="subgroup")


# --------------------------------------------------------------------------------------------
# One process


def test_world1_without_process_group(monkeypatch):
    assert not dist.is_initialized()
    for c in (CASES[2][0], CASES[2][3], CASES[3][3]):
        x, y = full(c)
        for squared in (False, True):
            got = dmedian(x, y, squared=squared, memory_budget=c["budget"])
            assert torch.equal(got, single(c, squared, None, monkeypatch)), c["name"]
    with pytest.raises(TypeError, match="squared must be a bool"):
        dmedian(x, squared=1)
    with pytest.raises(ValueError, match="at least 2 samples"):
        dmedian(x[:1])


def test_world1_process_group(monkeypatch):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        c = CASES[2][1]
        x, _ = full(c)
        got = dmedian(x, memory_budget=c["budget"])
        assert torch.equal(got, single(c, False, None, monkeypatch))
    finally:
        dist.destroy_process_group()
