"""The schemes under torch.distributed (gloo, 2 and 3 CPU processes): every rank ends with the
same gradients and statistics, equal to one process on the concatenation of the ranks' batches.

Each test spawns its ranks once (tests/ranks.py: free port, timeouts, a failing rank raises)
and runs several cases in them; the single-process results are computed here, from the same
seeds, on the concatenated batches.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import TOL
from ranks import run
from torch import nn
from torch.multiprocessing import ProcessRaisedException
from torch.nn.parallel import DistributedDataParallel as DDP

import nats_kernels as nk
from nats_kernels import schemes

B = 5  # rows per rank (equal local batches: DDP's own condition for "mean over ranks")
DTYPES = (torch.float32, torch.float64)


class Disc(nn.Module):
    """A small D with a frozen parameter and a trainable one that no loss reaches."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 8)
        self.l2 = nn.Linear(8, 1)
        self.unused = nn.Linear(2, 2)
        self.l1.bias.requires_grad_(False)

    def forward(self, x):
        return self.l2(F.leaky_relu(self.l1(x), 0.2))


class Gen(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(2, 6)
        self.l2 = nn.Linear(6, 3)
        self.unused = nn.Parameter(torch.ones(4))
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)

    def forward(self, z):
        return self.l2(torch.tanh(self.l1(z)))


def models(dtype, seed=0):
    torch.manual_seed(seed)
    return Gen().to(dtype), Disc().to(dtype)


def data(world, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    real = (torch.randn(world * B, 3, generator=g) + 1.0).to(dtype)
    z = torch.randn(world * B, 2, generator=g).to(dtype)
    return real, z


def grads(module):
    return [None if p.grad is None else p.grad.clone() for p in module.parameters()]


def wrap(module, how):
    """"ddp": DDP's defaults; "ddp-unused": find_unused_parameters=True (the models have a
    parameter no loss reaches, which DDP's own backward must be told about; the schemes then
    exchange the map of reached parameters); "ddp-small-buckets": 1-byte buckets, one flat
    buffer per gradient; anything else: the plain module."""
    if how == "ddp-small-buckets":
        return DDP(module, bucket_cap_mb=1 / 2**20)
    if how == "ddp-unused":
        return DDP(module, find_unused_parameters=True)
    return DDP(module) if how == "ddp" else module


class CountCollectives:
    """Counts the all-reduces the schemes issue (they all go through dist.all_reduce)."""

    def __enter__(self):
        self.calls, self._orig = 0, dist.all_reduce

        def counted(*args, **kwargs):
            self.calls += 1
            return self._orig(*args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


# --------------------------------------------------------------------------------- AWLoss


def aw_case(D, aw, real, fake):
    real_logits, fake_logits = D(real), D(fake)
    loss_real = F.relu(1 - real_logits).mean()
    loss_fake = F.relu(1 + fake_logits).mean()
    loss = aw.backward(loss_real, loss_fake, real_logits, fake_logits)
    return loss


def aw_worker(rank, world):
    out = []
    for dtype in DTYPES:
        for how in ("ddp", "ddp-unused", "group", "ddp-small-buckets"):
            for seed in (1, 2):
                G, D = models(dtype)
                real, z = data(world, dtype, seed)
                fake = G(z).detach()
                sl = slice(rank * B, (rank + 1) * B)
                Dw = wrap(D, how)
                aw = schemes.AWLoss(
                    Dw, process_group=dist.group.WORLD if how == "group" else None
                )
                with CountCollectives() as count:
                    loss = aw_case(Dw, aw, real[sl], fake[sl])
                out.append(dict(dtype=dtype, how=how, seed=seed, grads=grads(D), loss=loss,
                                weights=aw.last_weights, case=aw.last_case, calls=count.calls))
    return out


def aw_single(world, dtype, seed):
    G, D = models(dtype)
    real, z = data(world, dtype, seed)
    aw = schemes.AWLoss(D)
    loss = aw_case(D, aw, real, G(z).detach())
    return dict(grads=grads(D), loss=loss, weights=aw.last_weights, case=aw.last_case)


def assert_same_grads(got, want, dtype, what):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), f"{what}: param {i}: {a} vs {b}"
        if a is not None:
            torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m, i=i: f"{what} p{i}: {m}")


@pytest.mark.parametrize("world", (2, 3))
def test_awloss_matches_one_process(world):
    results = run(aw_worker, world)
    for case in results[0]:
        dtype, how, seed = case["dtype"], case["how"], case["seed"]
        what = f"{world} ranks, {how}, {dtype}, seed {seed}"
        want = aw_single(world, dtype, seed)
        mine = [r for rs in results for r in rs
                if (r["dtype"], r["how"], r["seed"]) == (dtype, how, seed)]
        assert len(mine) == world
        for r in mine:  # bit-identical across ranks
            for a, b in zip(r["grads"], mine[0]["grads"]):
                assert (a is None and b is None) or torch.equal(a, b), what
            assert torch.equal(r["case"], mine[0]["case"]), what
        got = mine[0]
        assert_same_grads(got["grads"], want["grads"], dtype, what)
        assert got["grads"][1] is None  # l1.bias is frozen: untouched
        assert got["grads"][4] is None and got["grads"][5] is None  # unused: None
        assert int(got["case"]) == int(want["case"]), what
        for a, b in zip(got["weights"], want["weights"]):
            torch.testing.assert_close(a, b, **TOL[dtype])
        torch.testing.assert_close(got["loss"], want["loss"], **TOL[dtype])
        # both gradient lists in one flat buffer (DDP's 25 MiB bucket) + the six statistics;
        # with 1-byte buckets, one per trainable gradient (2 x 5) + the statistics
        assert got["calls"] == (11 if how == "ddp-small-buckets" else 2), what


# -------------------------------------------------------------------------------------- BRC


def brc_case(G, D, brc, real, z):
    fake = G(z)
    fake_logits = D(fake)
    F_loss = F.softplus(-fake_logits).mean()
    f = F.softplus(-D(real)).mean() + F.softplus(fake_logits).mean()
    return brc.backward(F_loss, f)


BRC_WRAPS = (("ddp", "ddp"), ("plain", "ddp"), ("ddp", "plain"), ("plain", "plain"),
             ("ddp-unused", "ddp-unused"))


def preset_grad(G):
    """A .grad already there on one generator parameter: BRC accumulates into it."""
    G.l2.bias.grad = torch.full_like(G.l2.bias, 0.5)


def brc_worker(rank, world):
    out = []
    for dtype in DTYPES:
        for g_how, d_how in BRC_WRAPS:
            G, D = models(dtype)
            preset_grad(G)
            real, z = data(world, dtype, 3)
            sl = slice(rank * B, (rank + 1) * B)
            Gw, Dw = wrap(G, g_how), wrap(D, d_how)
            plain = (g_how, d_how) == ("plain", "plain")
            brc = schemes.BRC(Gw, Dw, process_group=dist.group.WORLD if plain else None)
            with CountCollectives() as count:
                r = brc_case(Gw, Dw, brc, real[sl], z[sl])
            out.append(dict(dtype=dtype, how=(g_how, d_how), r=r, grads=grads(G),
                            d_grads=grads(D), calls=count.calls))
    return out


def brc_single(world, dtype):
    G, D = models(dtype)
    preset_grad(G)
    real, z = data(world, dtype, 3)
    brc = schemes.BRC(G, D)
    r = brc_case(G, D, brc, real, z)
    return dict(r=r, grads=grads(G), d_grads=grads(D))


SOLVERS = (("cg", dict(iters=4, damping=0.1)),
           ("neumann", dict(iters=3, damping=0.1, neumann_step=0.1)))


def brc_solver_worker(rank, world):
    out = []
    for solver, kw in SOLVERS:
        for how in ("ddp", "plain"):
            G, D = models(torch.float64)
            preset_grad(G)
            real, z = data(world, torch.float64, 3)
            sl = slice(rank * B, (rank + 1) * B)
            Gw, Dw = wrap(G, how), wrap(D, how)
            group = dist.group.WORLD if how == "plain" else None
            brc = schemes.BRC(Gw, Dw, solver=solver, process_group=group, **kw)
            res = brc_case(Gw, Dw, brc, real[sl], z[sl])
            out.append(dict(solver=solver, how=how, residual=res, grads=grads(G),
                            d_grads=grads(D)))
    try:
        schemes.BRC(wrap(models(torch.float64)[0], "ddp-unused"),
                    wrap(models(torch.float64)[1], "ddp-unused"), solver="cg")
        refused = None
    except NotImplementedError as e:
        refused = str(e)
    return out, refused


def brc_solver_single(world, solver, kw):
    G, D = models(torch.float64)
    preset_grad(G)
    real, z = data(world, torch.float64, 3)
    brc = schemes.BRC(G, D, solver=solver, **kw)
    res = brc_case(G, D, brc, real, z)
    return dict(residual=res, grads=grads(G))


def test_brc_solvers_match_one_process():
    """cg / neumann under 2 ranks (DDP-wrapped, or plain with process_group): every rank solves
    the system of one process on the concatenated batch (dF/dD and each Hessian-vector product
    averaged over the ranks), and ends with the same generator gradient."""
    world = 2
    results = run(brc_solver_worker, world)
    for i, (solver, kw) in enumerate(s for s in SOLVERS for _ in (0, 1)):
        want = brc_solver_single(world, solver, kw)
        first = results[0][0][i]
        for rank in range(world):
            got = results[rank][0][i]
            what = f"{solver}, {got['how']}, rank {rank}"
            assert got["solver"] == solver
            assert torch.equal(got["residual"], first["residual"]), what
            torch.testing.assert_close(got["residual"], want["residual"], rtol=1e-9, atol=1e-12)
            assert_same_grads(got["grads"], want["grads"], torch.float64, what)
            assert got["grads"][0] is None and got["grads"][1] is None  # G.unused, G.frozen
            assert all(g is None for g in got["d_grads"]), what
    for _, refused in results:
        assert refused is not None and "find_unused_parameters" in refused


@pytest.mark.parametrize("world", (2, 3))
def test_brc_matches_one_process(world):
    results = run(brc_worker, world)
    for i, case in enumerate(results[0]):
        dtype, how = case["dtype"], case["how"]
        what = f"{world} ranks, G/D {how}, {dtype}"
        want = brc_single(world, dtype)
        for rank in range(world):
            got = results[rank][i]
            assert got["how"] == how
            assert torch.equal(got["r"], results[0][i]["r"]), what
            torch.testing.assert_close(got["r"], want["r"], **TOL[dtype])
            assert_same_grads(got["grads"], want["grads"], dtype, f"{what}, rank {rank}")
            # unused keeps None, frozen untouched, D's .grad not written
            assert got["grads"][0] is None and got["grads"][1] is None  # G.unused, G.frozen
            assert all(g is None for g in got["d_grads"]), what
            # one flat buffer for df/dD and dF/dD, one for G's corrected gradient, and with a
            # find_unused_parameters wrapper the map of reached parameters
            assert got["calls"] == (3 if "ddp-unused" in how else 2), what


# ----------------------------------------------------------------- NestedTrainer (accumulate)


def nested_run(rank, world, dtype, how):
    """One outer iteration (n_d = 2) of NestedTrainer in accumulate mode: D steps with a
    plain backward (DDP averages), generator blocks through the trainer."""
    G, D = models(dtype)
    real, z = data(world, dtype, 4)
    sl = slice(rank * B, (rank + 1) * B) if rank is not None else slice(None)
    Gw = wrap(G, how) if rank is not None else G
    Dw = wrap(D, how) if rank is not None else D  # "ddp-unused": D has an unused parameter
    opt_d = torch.optim.SGD([p for p in D.parameters() if p.requires_grad], lr=0.1)
    opt_g = torch.optim.SGD([p for p in G.parameters() if p.requires_grad], lr=0.1)
    step = [0]

    def d_step():
        opt_d.zero_grad()
        loss = F.softplus(-Dw(real[sl])).mean() + F.softplus(Dw(Gw(z[sl]).detach())).mean()
        loss.backward()
        if how == "group" and rank is not None:  # a plain D: average by hand, as a user would
            for p in D.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        opt_d.step()

    def g_step():
        step[0] += 1
        return F.softplus(-Dw(Gw(z[sl] * step[0]))).mean()

    group = dist.group.WORLD if (how == "group" and rank is not None) else None
    trainer = schemes.NestedTrainer(d_step, g_step, n_d=2, weights=[1.0, 0.25],
                                    mode="accumulate", g_optimizer=opt_g, generator=Gw,
                                    process_group=group)
    trainer.run_outer()
    return [p.detach().clone() for p in G.parameters()]


def nested_worker(rank, world):
    return {(dtype, how): nested_run(rank, world, dtype, how)
            for dtype in DTYPES for how in ("ddp-unused", "group")}


def test_nested_accumulate_matches_one_process():
    world = 2
    results = run(nested_worker, world)
    for (dtype, how), params in results[0].items():
        want = nested_run(None, world, dtype, how)
        start, _ = models(dtype)
        for rank in range(world):
            got = results[rank][(dtype, how)]
            for i, (a, b) in enumerate(zip(got, want)):
                torch.testing.assert_close(a, b, **TOL[dtype],
                                           msg=lambda m, i=i, h=how: f"{h} p{i} {m}")
        # G.l1.weight moved (the comparison is not of two unchanged models); G.unused did not
        assert params[2].shape == start.l1.weight.shape
        assert not torch.equal(params[2], start.l1.weight.detach())
        assert torch.equal(params[0], start.unused.detach())


# ----------------------------------------------------------------------------- AnnealedCFG


def cfg_worker(rank, world, wrap_how):
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))
    D = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 1))
    if wrap_how == "ddp":
        G, D = DDP(G), DDP(D)
    group = dist.group.WORLD if wrap_how == "group" else None
    rng = torch.Generator().manual_seed(100 + rank)  # each rank its own z
    model = schemes.AnnealedCFG(G, D, M=3, eta=0.5, weights=nk.annealed_weights(1, 0.1, 3),
                                N=24, x_epochs=2, batch_size=8, z_dim=2, rng=rng, lr=1e-2,
                                process_group=group)
    g = torch.Generator().manual_seed(7 + rank)
    batches = [torch.randn(8, 3, generator=g) for _ in range(3)]
    model.train_stage(batches)
    state = model.state_dict()
    samples = model.generate(4)
    return dict(g=state["generator"], d=state["discriminator"], snaps=state["snapshots"],
                approx=model.last_approx_loss, samples=samples)


@pytest.mark.parametrize("wrap_how", ("ddp", "group", "none"))
def test_annealed_cfg_ranks_stay_identical(wrap_how):
    """DDP-wrapped or process_group: G, D, the snapshots and the approximator's loss are
    identical on every rank after a stage although every rank saw other data; generate runs per
    rank (different z, different samples). "none" is the control: without a group the ranks
    drift apart, so the identity above is not an accident of the setup."""
    r0, r1 = run(cfg_worker, 2, wrap_how)
    same = all(torch.equal(r0["g"][k], r1["g"][k]) for k in r0["g"])
    same &= all(torch.equal(r0["d"][k], r1["d"][k]) for k in r0["d"])
    same &= all(torch.equal(a[k], b[k]) for a, b in zip(r0["snaps"], r1["snaps"]) for k in a)
    if wrap_how == "none":
        assert not same
        return
    assert same
    assert torch.equal(r0["approx"], r1["approx"])
    assert not torch.equal(r0["samples"], r1["samples"])
    assert list(r0["g"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]  # unwrapped state


# ----------------------------------------------------------------------------- arguments


def misc_worker(rank, world):
    out = {}
    g = torch.Generator().manual_seed(5)
    real, fake = torch.randn(23, 4, generator=g), torch.randn(9, 4, generator=g) + 1
    cuts_r, cuts_f = ((0, 20, 23), (0, 0, 9)) if world == 2 else None  # rank 1: 3 rows; no fakes
    out["distances"] = schemes.initial_weight_distances(
        real[cuts_r[rank]:cuts_r[rank + 1]], fake[cuts_f[rank]:cuts_f[rank + 1]],
        group=dist.group.WORLD)
    try:
        schemes.AWLoss(nn.Linear(2, 1), process_group="world")
    except TypeError as e:
        out["type"] = str(e)
    torch.manual_seed(0)
    try:  # rank 1 holds another model: refused on every rank at construction
        schemes.AWLoss(nn.Linear(2 + rank, 1), process_group=dist.group.WORLD)
    except ValueError as e:
        out["layout"] = str(e)
    return out


def test_bad_arguments_raise_on_every_rank_and_initial_distances():
    g = torch.Generator().manual_seed(5)
    real, fake = torch.randn(23, 4, generator=g), torch.randn(9, 4, generator=g) + 1
    want = schemes.initial_weight_distances(real, fake)
    for out in run(misc_worker, 2):
        assert "ProcessGroup" in out["type"]
        assert "differ between ranks" in out["layout"]
        # the medians over the union of unequal shards (rank 1 holds no fake sample)
        for got, exp in zip(out["distances"], want):
            torch.testing.assert_close(got, exp, **TOL[torch.float32])


def failing_worker(rank, world):
    D = DDP(nn.Linear(3, 1))
    aw = schemes.AWLoss(D)
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    real, fake = D(torch.randn(4, 3)), D(torch.randn(4, 3))
    aw.backward(real.mean(), fake.mean(), real, fake)  # rank 0 waits in the all-reduce


def test_failing_rank_ends_the_run_with_its_error():
    with pytest.raises(ProcessRaisedException, match="rank 1 fails on purpose"):
        run(failing_worker, 2, timeout=120)


# ---------------------------------------------- parameters reached on some ranks only, options


class BranchD(nn.Module):
    """A D with a branch that only rows with x[:, 0] > 4 take: data-dependent control flow, so
    on a rank without such rows the branch's parameters get no gradient at all."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.extra = nn.Linear(3, 8), nn.Linear(8, 1), nn.Linear(3, 1)

    def forward(self, x):
        out = self.l2(torch.tanh(self.l1(x)))
        mask = x[:, 0] > 4
        if mask.any():
            out = out + torch.where(mask[:, None], self.extra(x), torch.zeros_like(out))
        return out


def branch_data(world, dtype):
    real, z = data(world, dtype, 6)
    real[1, 0] = 6.0  # one row of rank 0's shard takes the branch
    return real, z


def branch_case(rank, world, dtype):
    """AWLoss and BRC with find_unused_parameters=True and a branch only rank 0 takes; rank None:
    one process on the concatenation."""
    torch.manual_seed(0)
    G, D = Gen().to(dtype), BranchD().to(dtype)
    real, z = branch_data(world, dtype)
    if rank is not None:
        sl = slice(rank * B, (rank + 1) * B)
        real, z = real[sl], z[sl]
        Gw = DDP(G, find_unused_parameters=True)
        Dw = DDP(D, find_unused_parameters=True)
    else:
        Gw, Dw = G, D
    aw = schemes.AWLoss(Dw)
    aw_case(Dw, aw, real, G(z).detach())
    d_grads = grads(D)
    brc = schemes.BRC(Gw, Dw)
    r = brc_case(Gw, Dw, brc, real, z)
    return dict(d=d_grads, weights=aw.last_weights, r=r, g=grads(G))


def branch_worker(rank, world):
    out = {dtype: branch_case(rank, world, dtype) for dtype in DTYPES}
    refused = []
    for make in (lambda: schemes.AWLoss(DDP(Disc(), static_graph=True)),
                 lambda: schemes.BRC(DDP(Gen(), static_graph=True), Disc())):
        try:
            make()
        except ValueError as e:
            refused.append(str(e))
    out["refused"] = refused
    return out


def test_parameters_reached_on_some_ranks_and_static_graph():
    """With find_unused_parameters=True the used map is exchanged: the rank that did not reach
    the branch still gets its averaged gradient, as one process on the whole batch does (before,
    that rank kept None and left the branch out of the aw dots). static_graph=True is refused."""
    results = run(branch_worker, 2)
    for dtype in DTYPES:
        want = branch_case(None, 2, dtype)
        assert want["d"][4] is not None  # the branch is reached in the whole batch
        for rank, res in enumerate(results):
            got = res[dtype]
            what = f"rank {rank}, {dtype}"
            assert_same_grads(got["d"], want["d"], dtype, f"aw {what}")
            for a, b in zip(got["weights"], want["weights"]):
                torch.testing.assert_close(a, b, **TOL[dtype])
            torch.testing.assert_close(got["r"], want["r"], **TOL[dtype])
            assert_same_grads(got["g"], want["g"], dtype, f"brc {what}")
    for res in results:
        assert len(res["refused"]) == 2
        assert all("static_graph" in m for m in res["refused"])
