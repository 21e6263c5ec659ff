"""AnnealedCFG's per-stage checks of the official ``cfggan.py`` (design §1.4): the stage's
``D(real) - D(fake)`` (``last_stage_diff``) against the official ``DDG.icfg`` written here its
own way, the ``diff_max`` stop (``DiffMaxExceeded``) on either side of its threshold and
before/after ``diff_max_after``, the NaN check naming the stage and the sum(s) that were NaN, the
arguments' checks, the host reads each setting makes (none added with ``diff_max=None``), and
the value shared by the ranks of a process group.

Tiny float64 models and seeds as in tests/test_schemes_nested_cfg.py; the backend is the
default one (these checks are no op's: the ops are covered there)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from ranks import run
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import nats_kernels as nk
from nats_kernels.schemes import AnnealedCFG
from nats_kernels.schemes.cfg import DiffMaxExceeded

# Tiny models: a 2-thread pool only adds waiting (see conftest.threads).
pytestmark = pytest.mark.single_thread

DT = torch.float64
Z = 3
ARGS = dict(M=3, eta=0.4, U=2, N=20, x_epochs=4, batch_size=8)
PER_STAGE = ARGS["M"] * ARGS["U"]  # real batches a stage consumes


def _mlp_g():
    return nn.Sequential(nn.Linear(Z, 16, bias=False), nn.BatchNorm1d(16), nn.Tanh(),
                         nn.Linear(16, 2)).to(DT)


def _mlp_d(outputs=1):
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, outputs)).to(DT)


def _batches(count, seed=7, rows=12):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 2, generator=gen, dtype=DT) * 0.3 + 1.0 for _ in range(count)]


def _cfg(G=None, D=None, **kw):
    torch.manual_seed(3)
    G = _mlp_g() if G is None else G
    D = _mlp_d() if D is None else D
    return AnnealedCFG(G, D, weights=nk.annealed_weights(1.0, 0.01, 3, dtype=DT), lr=2e-3,
                       z_dim=Z, rng=torch.Generator().manual_seed(11), **{**ARGS, **kw})


def _same_state(m1, m2):
    return all(torch.equal(x, y) for x, y in zip(m1.state_dict().values(),
                                                 m2.state_dict().values()))


def _official_icfg(cfg, batches):
    """``DDG.icfg`` of the official cfggan.py, written its way, from copies of ``cfg``'s state
    (G, D, D's RMSprop state, the random generator's state; nothing of ``cfg`` is touched).
    Returns the official ``(sum_real - sum_fake) / count`` -- the sums restart at each ``t``,
    ``float(d_out.sum())`` added in Python floats -- and the discriminator it ends with."""
    G, D = copy.deepcopy(cfg.generator), copy.deepcopy(cfg.discriminator)
    opt = torch.optim.RMSprop(D.parameters(), lr=cfg.lr, alpha=0.95, eps=1e-18)
    opt.load_state_dict(copy.deepcopy(cfg.d_optimizer.state_dict()))
    rng = torch.Generator()
    rng.set_state(cfg.rng.get_state())
    w = cfg.weights.tolist()
    snaps = [copy.deepcopy(D) for _ in range(cfg.M)]
    it = iter(batches)
    G.eval()  # the official generate's is_train=False
    for t in range(cfg.M):
        sum_real = sum_fake = count = 0
        for _ in range(cfg.U):
            real = next(it)
            num = real.shape[0]
            with torch.no_grad():
                fake = G(torch.randn(num, Z, generator=rng, dtype=DT))
            for t0 in range(t):
                fake = fake.detach()
                fake.requires_grad = True
                d_out = snaps[t0](fake)
                d_out.backward(torch.ones_like(d_out))
                fake.data += cfg.eta * w[t0] * fake.grad.data
            fake = fake.detach()
            d_out_real, d_out_fake = D(real), D(fake)
            loss = (torch.log(1 + torch.exp(-d_out_real))
                    + torch.log(1 + torch.exp(d_out_fake))).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                sum_real += float(d_out_real.sum())
                sum_fake += float(d_out_fake.sum())
                count += num
        snaps[t].load_state_dict(D.state_dict())
    return (sum_real - sum_fake) / count, D


# ----------------------------------------------------------------------- last_stage_diff


@pytest.mark.parametrize("outputs", [1, 3], ids=["one-logit", "3-outputs"])
def test_last_stage_diff_is_the_official_icfg_value(outputs):
    """Two stages, each against the official icfg run from the same state on the same batches
    (every output of a sample counts, divided by the number of samples)."""
    cfg = _cfg(D=_mlp_d(outputs))
    assert cfg.last_stage_diff is None
    for stage in range(2):
        batches = _batches(PER_STAGE, seed=7 + stage)
        expected, d_after = _official_icfg(cfg, batches)
        cfg.train_stage(batches)
        diff = cfg.last_stage_diff
        assert isinstance(diff, torch.Tensor) and diff.dim() == 0
        assert diff.dtype == torch.float64 and diff.device == cfg.device
        assert not diff.requires_grad
        # the oracle followed the same path: it ends with the same D
        for x, y in zip(cfg.discriminator.state_dict().values(), d_after.state_dict().values()):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)
        assert math.isclose(diff.item(), expected, rel_tol=1e-9, abs_tol=1e-11), (
            stage, diff.item(), expected)
    assert cfg.stage == 2


def test_last_stage_diff_keeps_the_default_stage_unchanged():
    """diff_max given (and never exceeded) or not: bit-identical stages."""
    plain, checked = _cfg(), _cfg(diff_max=1e9, diff_max_after=0)
    for stage in range(2):
        batches = _batches(PER_STAGE, seed=7 + stage)
        plain.train_stage(batches)
        checked.train_stage(batches)
    assert _same_state(plain.generator, checked.generator)
    assert _same_state(plain.discriminator, checked.discriminator)
    assert torch.equal(plain.last_stage_diff, checked.last_stage_diff)


# ------------------------------------------------------------------------------- diff_max


def _reference_diffs():
    """The host values of last_stage_diff of two plain stages, and the states after each."""
    cfg = _cfg()
    diffs, states = [], []
    for stage in range(2):
        cfg.train_stage(_batches(PER_STAGE, seed=7 + stage))
        diffs.append(cfg.last_stage_diff.item())
        states.append(copy.deepcopy(cfg.state_dict()))
    return diffs, states


def test_diff_max_at_the_threshold_does_not_stop():
    diffs, states = _reference_diffs()
    assert all(d != 0 for d in diffs)
    cfg = _cfg(diff_max=max(abs(d) for d in diffs), diff_max_after=0)  # not exceeded: > only
    for stage in range(2):
        cfg.train_stage(_batches(PER_STAGE, seed=7 + stage))
    assert cfg.stage == 2
    assert all(torch.equal(a, b) for a, b in zip(cfg.generator.state_dict().values(),
                                                 states[1]["generator"].values()))


def test_diff_max_just_below_stops_before_the_approximator():
    diffs, states = _reference_diffs()
    threshold = math.nextafter(abs(diffs[0]), 0.0)
    cfg = _cfg(diff_max=threshold, diff_max_after=0)
    g_before = copy.deepcopy(cfg.generator)
    with pytest.raises(DiffMaxExceeded, match=r"exceeded diff_max = .* in stage 0") as info:
        cfg.train_stage(_batches(PER_STAGE, seed=7))
    e = info.value
    assert isinstance(e, RuntimeError)
    assert (e.stage, e.diff, e.diff_max) == (0, diffs[0], threshold)
    assert cfg.last_stage_diff.item() == diffs[0]
    # The discriminator phase ran (D is the plain stage's), the approximator did not.
    assert all(torch.equal(a, b) for a, b in zip(cfg.discriminator.state_dict().values(),
                                                 states[0]["discriminator"].values()))
    for snap, ref in zip(cfg.snapshots, states[0]["snapshots"]):
        assert all(torch.equal(a, b) for a, b in zip(snap.state_dict().values(), ref.values()))
    assert _same_state(cfg.generator, g_before)
    assert cfg.stage == 0 and cfg.last_approx_loss is None


def test_diff_max_waits_for_diff_max_after():
    diffs, _ = _reference_diffs()
    tiny = min(abs(d) for d in diffs) / 2  # exceeded in both stages
    # The official start-up phase (2000 stages) by default: no stop in stages 0 and 1.
    cfg = _cfg(diff_max=tiny)
    assert cfg.diff_max_after == 2000
    for stage in range(2):
        cfg.train_stage(_batches(PER_STAGE, seed=7 + stage))
    assert cfg.stage == 2
    # From stage 1 on: stage 0 completes, stage 1 stops.
    cfg = _cfg(diff_max=tiny, diff_max_after=1)
    cfg.train_stage(_batches(PER_STAGE, seed=7))
    assert cfg.stage == 1
    with pytest.raises(DiffMaxExceeded, match="in stage 1") as info:
        cfg.train_stage(_batches(PER_STAGE, seed=8))
    assert info.value.stage == 1 and info.value.diff == diffs[1] and cfg.stage == 1


# ------------------------------------------------------------------------------------ NaN


class NaNOnCall(nn.Module):
    """A generator whose output is NaN on its ``call``-th call (0-based): with one call per
    discriminator step, ``call = M * U - 1`` makes only the last step's D(fake) NaN."""

    def __init__(self, call):
        super().__init__()
        self.net, self.call, self.calls = _mlp_g(), call, 0

    def forward(self, z):
        out = self.net(z)
        if self.calls == self.call:
            out = out * math.nan
        self.calls += 1
        return out


def _nan_real_batches():
    """A stage's batches whose last one (the last snapshot's last step) holds a NaN row."""
    batches = _batches(PER_STAGE)
    batches[-1] = batches[-1].clone()
    batches[-1][5, 1] = math.nan
    return batches


def _nan_case(which):
    """(cfg arguments, batches) for a stage whose D(real), D(fake) or both sums are NaN."""
    if which == "real":
        return {}, _nan_real_batches()
    if which == "fake":
        return {"G": NaNOnCall(PER_STAGE - 1)}, _batches(PER_STAGE)
    torch.manual_seed(3)
    D = _mlp_d()
    with torch.no_grad():
        D[2].bias.fill_(math.nan)
    return {"D": D}, _batches(PER_STAGE)


NAN_MESSAGES = {
    "real": r"NaN in stage 0: the sum of D\(real\) over the last snapshot's U = 2 step",
    "fake": r"NaN in stage 0: the sum of D\(fake\) over the last snapshot's U = 2 step",
    "both": r"NaN in stage 0: the sum of D\(real\) and of D\(fake\) over",
}


@pytest.mark.parametrize("which", ["real", "fake", "both"])
def test_nan_raises_at_the_end_of_the_discriminator_phase(which):
    """With diff_max given, where the official code raises: before the approximator."""
    kw, batches = _nan_case(which)
    cfg = _cfg(diff_max=1e9, diff_max_after=0, **kw)
    g_before = copy.deepcopy(cfg.generator)
    with pytest.raises(RuntimeError, match=NAN_MESSAGES[which]) as info:
        cfg.train_stage(batches)
    assert not isinstance(info.value, DiffMaxExceeded)
    assert math.isnan(cfg.last_stage_diff.item())
    assert _same_state(cfg.generator, g_before) and cfg.last_approx_loss is None
    assert cfg.stage == 0


@pytest.mark.parametrize("which", ["real", "fake", "both"])
def test_nan_raises_with_the_approximators_first_read(which):
    """diff_max=None, the lr rule on: the same error from the first epoch mean's read (the D
    sums' NaN is named, not the approximator loss it causes)."""
    kw, batches = _nan_case(which)
    cfg = _cfg(**kw)
    with pytest.raises(RuntimeError, match=NAN_MESSAGES[which]):
        cfg.train_stage(batches)
    assert cfg.stage == 0 and math.isnan(cfg.last_stage_diff.item())


def test_nan_names_the_stage_and_is_not_checked_without_any_host_read():
    cfg = _cfg(diff_max=1e9, diff_max_after=0)
    cfg.train_stage(_batches(PER_STAGE))
    with pytest.raises(RuntimeError, match=r"NaN in stage 1: the sum of D\(real\)"):
        cfg.train_stage(_nan_real_batches())
    # No diff_max and no lr rule: no host read, so no check; the value is there to read.
    cfg = _cfg(approx_decay=0.0)
    cfg.train_stage(_nan_real_batches())
    assert cfg.stage == 1 and math.isnan(cfg.last_stage_diff.item())


# ------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    "kw,err,match",
    [
        (dict(diff_max=-1.0), ValueError, r"diff_max must be positive.*None switches"),
        (dict(diff_max=0), ValueError, r"diff_max must be positive.*None switches"),
        (dict(diff_max=-math.inf), ValueError, "diff_max must be positive"),
        (dict(diff_max=math.nan), ValueError, "diff_max must be positive and finite"),
        (dict(diff_max=math.inf), ValueError, "diff_max must be positive and finite"),
        (dict(diff_max="40"), TypeError, "diff_max must be a Python number"),
        (dict(diff_max=True), TypeError, "diff_max must be a Python number"),
        (dict(diff_max=torch.tensor(40.0)), TypeError, "diff_max must be a Python number"),
        (dict(diff_max_after=-1), ValueError, "diff_max_after must be >= 0"),
        (dict(diff_max_after=1.5), TypeError, "diff_max_after must be a Python int"),
        (dict(diff_max_after=True), TypeError, "diff_max_after must be a Python int"),
        (dict(diff_max_after=None), TypeError, "diff_max_after must be a Python int"),
        (dict(approx_redmax=-1), ValueError, "approx_redmax must be >= 0"),
    ],
    ids=repr,
)
def test_bad_arguments(kw, err, match):
    with pytest.raises(err, match=match):
        _cfg(**kw)


def test_good_arguments():
    cfg = _cfg()
    assert cfg.diff_max is None and cfg.diff_max_after == 2000
    cfg = _cfg(diff_max=40, diff_max_after=0, approx_redmax=0)
    assert cfg.diff_max == 40.0 and type(cfg.diff_max) is float and cfg.diff_max_after == 0
    assert cfg.approx_redmax == 0


# ----------------------------------------------------------------------------- host reads

HOST_READS = ("item", "tolist", "numpy", "__float__", "__int__", "__index__", "__bool__")


@pytest.mark.parametrize(
    "approx_decay,diff_max,reads",
    [
        (0.0, None, 0),  # nothing read at all
        (0.1, None, ARGS["x_epochs"]),  # the lr rule's one read per epoch, no more
        (0.0, 40.0, 1),  # the check's one read per stage
        (0.1, 40.0, 1 + ARGS["x_epochs"]),
    ],
)
def test_host_reads_per_stage(monkeypatch, approx_decay, diff_max, reads):
    """Every way a tensor's value reaches the host, counted over a whole stage (after
    construction, whose weight check is not the stage's)."""
    cfg = _cfg(approx_decay=approx_decay, diff_max=diff_max, diff_max_after=0)
    batches = _batches(PER_STAGE)
    seen = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            seen.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    cfg.train_stage(batches)
    monkeypatch.undo()
    assert len(seen) == reads, seen
    assert cfg.stage == 1 and cfg.last_stage_diff is not None


# ---------------------------------------------------------------------------- process group


def stage_checks_worker(rank, world):
    """Two ranks with unequal batches (4 and 6 rows): the local sums seen by a d_backward hook,
    the group's last_stage_diff, and a diff_max stop taken by both ranks alike."""
    out = {}
    seen = []

    def hook(loss_real, loss_fake, real_logits, fake_logits):
        seen.append((real_logits.detach().sum().item(), fake_logits.detach().sum().item(),
                     real_logits.shape[0]))
        loss = loss_real + loss_fake
        loss.backward()  # DDP averages D's gradients
        return loss.detach()

    rows = 4 + 2 * rank
    g = torch.Generator().manual_seed(7 + rank)
    batches = [torch.randn(rows, 2, generator=g, dtype=DT) + 1.0 for _ in range(4)]
    for diff_max in (None, 1e-12):
        torch.manual_seed(0)
        G = DDP(nn.Sequential(nn.Linear(Z, 8), nn.Tanh(), nn.Linear(8, 2)).to(DT))
        D = DDP(_mlp_d())
        cfg = AnnealedCFG(G, D, M=2, U=2, eta=0.5, weights=None, N=8, x_epochs=1,
                          batch_size=4, z_dim=Z, lr=1e-2, d_backward=hook,
                          rng=torch.Generator().manual_seed(100 + rank),
                          diff_max=diff_max, diff_max_after=0)
        seen.clear()
        try:
            cfg.train_stage(batches)
            out[diff_max] = None
        except DiffMaxExceeded as e:
            out[diff_max] = e.stage
        out[f"diff {diff_max}"] = cfg.last_stage_diff
        out[f"local {diff_max}"] = list(seen[-2:])  # the last snapshot's U = 2 steps
    return out


def test_ranks_share_last_stage_diff_and_the_stop():
    r0, r1 = run(stage_checks_worker, 2)
    local = r0["local None"] + r1["local None"]
    expected = (sum(r for r, _, _ in local) - sum(f for _, f, _ in local)) / sum(
        n for _, _, n in local)
    assert [n for _, _, n in local] == [4, 4, 6, 6]
    assert torch.equal(r0["diff None"], r1["diff None"])
    assert math.isclose(r0["diff None"].item(), expected, rel_tol=1e-12)
    assert r0[None] is None and r1[None] is None
    assert r0[1e-12] == 0 and r1[1e-12] == 0  # both stopped, neither left waiting
    assert torch.equal(r0["diff 1e-12"], r1["diff 1e-12"])
