"""nested_schedule / NestedTrainer (design §2), AnnealedCFG (design §1) and NATS Technique 1
(design §3) against oracles written here: hand-written nested loops, a naive CFG loop in the
official code's style, torch.cdist + torch.median.

Every test that reaches an op (NestedTrainer's accumulate mode: cfg_accumulate_list; AnnealedCFG:
cfg_step_; initial_weight_distances: median_pairwise_distance) runs once per backend that
implements it (``helpers.cases``), so the reference kernels are checked here too and not only the
one ``auto`` picks. The schedule, the loss and lr modes (no op), argument checks and presets run
once."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import cases
from torch import nn

import nats_kernels as nk
from nats_kernels.schemes import (
    AnnealedCFG,
    AWLoss,
    NestedTrainer,
    initial_weight_distances,
    nested_schedule,
    preset_weights,
)

# Tiny models: a 2-thread pool only adds waiting (see conftest.threads).
pytestmark = pytest.mark.single_thread

# (device, backend) pairs of the ops each scheme calls.
on_accumulate_backends = pytest.mark.parametrize("device,backend", cases("cfg_accumulate_list"))
on_cfg_backends = pytest.mark.parametrize("device,backend", cases("cfg_step_"))
on_cfg_aw_backends = pytest.mark.parametrize(
    "device,backend", cases("cfg_step_", "multi_dot", "aw_weights", "aw_combine_"))
on_median_backends = pytest.mark.parametrize(
    "device,backend", cases("median_pairwise_distance"))

# ------------------------------------------------------------------------------ nested_schedule


def _kinds(items):
    return "".join(kind for kind, _ in items)


def test_schedule_paper_example_and_cts():
    # The paper's worked example (Section III-D): K = 1, N_d = 4 -> D G, D GG, D GGG, D GGGG.
    assert _kinds(nested_schedule(4)) == "DG" + "DGG" + "DGGG" + "DGGGG"
    # N_d = 1 is the common alternating scheme.
    assert list(nested_schedule(1)) == [("D", None), ("G", 1.0)]
    assert _kinds(nested_schedule(1, k=5)) == "DDDDDG"


@pytest.mark.parametrize("n_d,k", [(1, 1), (2, 3), (5, 1), (7, 2), (20, 1)])
def test_schedule_blocks_counts_and_weights(n_d, k):
    weights = [float(3 + 2 * i) for i in range(n_d)]  # distinct, so positions are visible
    items = list(nested_schedule(n_d, weights, k=k))
    assert sum(kind == "D" for kind, _ in items) == n_d * k
    assert sum(kind == "G" for kind, _ in items) == n_d * (n_d + 1) // 2
    # Cut at each run of D items: block j is k D's then G's weighted w[1], ..., w[j].
    blocks, pos = [], 0
    while pos < len(items):
        d_run = 0
        while pos < len(items) and items[pos][0] == "D":
            assert items[pos][1] is None
            d_run, pos = d_run + 1, pos + 1
        g_weights = []
        while pos < len(items) and items[pos][0] == "G":
            g_weights.append(items[pos][1])
            pos += 1
        blocks.append((d_run, g_weights))
    assert blocks == [(k, weights[:j]) for j in range(1, n_d + 1)]
    assert all(type(w) is float for kind, w in items if kind == "G")


def test_schedule_nts_is_all_ones_and_tensor_weights_stay_on_device():
    assert [w for kind, w in nested_schedule(3) if kind == "G"] == [1.0] * 6
    w = nk.annealed_weights(1.0, 0.01, 3, dtype=torch.float64)
    got = [x for kind, x in nested_schedule(3, w) if kind == "G"]
    assert len(got) == 6
    for x, i in zip(got, [0, 0, 1, 0, 1, 2]):
        # A 0-d view into the caller's tensor: no host read, no copy.
        assert isinstance(x, torch.Tensor) and x.dim() == 0
        assert x.data_ptr() == w[i].data_ptr() and x.device == w.device
    # The same numbers as a Python list.
    assert [x for kind, x in nested_schedule(3, w.tolist()) if kind == "G"] == [
        w[i].item() for i in [0, 0, 1, 0, 1, 2]
    ]


@pytest.mark.parametrize(
    "args,kwargs,err,match",
    [
        ((0,), {}, ValueError, "n_d"),
        ((2.0,), {}, TypeError, "n_d"),
        ((True,), {}, TypeError, "n_d"),
        ((3,), dict(k=0), ValueError, "k"),
        ((3,), dict(k=1.5), TypeError, "k"),
        ((3, [1.0, 0.5]), {}, ValueError, "2 entries"),
        ((3, [1.0, 0.5, -0.1]), {}, ValueError, r"weights\[2\]"),
        ((3, [1.0, 0.5, math.nan]), {}, ValueError, r"weights\[2\]"),
        ((3, [1.0, "x", 0.1]), {}, TypeError, r"weights\[1\]"),
        ((3, "abc"), {}, TypeError, "weights"),
        ((3, torch.ones(2)), {}, ValueError, r"shape \(n_d,\)"),
        ((3, torch.ones(3, 1)), {}, ValueError, "shape"),
        ((3, torch.ones(3, dtype=torch.int64)), {}, TypeError, "floating"),
    ],
)
def test_schedule_bad_input_raises_at_call(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        nested_schedule(*args, **kwargs)  # no next(): checked eagerly


# ------------------------------------------------------------------------------ NestedTrainer


class TinyGAN:
    """A 2-D toy GAN with fixed data: G, D linear-ish, separate seeds for each z draw."""

    def __init__(self, seed=0, dtype=torch.float64, extra_param=False, device="cpu"):
        torch.manual_seed(seed)
        self.G = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
        if extra_param:  # a parameter that no loss reaches
            self.G.unused = nn.Parameter(torch.ones(4, dtype=dtype))
        self.D = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
        self.G.to(device)
        self.D.to(device)
        self.dtype, self.device = dtype, device
        self.gen = torch.Generator().manual_seed(seed + 100)  # draws on the CPU, then moved

    def z(self):
        return torch.randn(16, 3, generator=self.gen, dtype=self.dtype).to(self.device)

    def real(self):
        return (torch.randn(16, 2, generator=self.gen, dtype=self.dtype) + 2).to(self.device)

    def d_loss(self):
        fake = self.G(self.z()).detach()
        sp = nn.functional.softplus
        return sp(-self.D(self.real())).mean() + sp(self.D(fake)).mean()

    def g_loss(self):
        return nn.functional.softplus(-self.D(self.G(self.z()))).mean()

    def params(self):
        return [p.detach().clone() for p in [*self.G.parameters(), *self.D.parameters()]]


def _equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def _d_step(gan, opt_d):
    def d_step():
        opt_d.zero_grad()
        gan.d_loss().backward()
        opt_d.step()

    return d_step


@pytest.mark.parametrize("weights", [None, [1.0, 0.3, 0.09], "tensor"])
@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
def test_trainer_loss_mode_matches_hand_written_loop(weights, opt_cls):
    n_d, k, n_outer = 3, 2, 2
    if weights == "tensor":
        weights = nk.annealed_weights(1.0, 0.05, n_d, dtype=torch.float64)
    w_list = [1.0] * n_d if weights is None else [float(x) for x in weights]

    # Oracle: the nested loop written out, loss multiplied by w[i].
    a = TinyGAN()
    opt_ga, opt_da = opt_cls(a.G.parameters(), lr=0.05), opt_cls(a.D.parameters(), lr=0.05)
    for _ in range(n_outer):
        for j in range(1, n_d + 1):
            for _ in range(k):
                opt_da.zero_grad()
                a.d_loss().backward()
                opt_da.step()
            for i in range(j):
                opt_ga.zero_grad()
                (w_list[i] * a.g_loss()).backward()
                opt_ga.step()

    b = TinyGAN()
    opt_gb, opt_db = opt_cls(b.G.parameters(), lr=0.05), opt_cls(b.D.parameters(), lr=0.05)
    seen = []

    def g_step(w):
        seen.append(w)
        opt_gb.zero_grad()
        (w * b.g_loss()).backward()
        opt_gb.step()

    trainer = NestedTrainer(_d_step(b, opt_db), g_step, n_d=n_d, weights=weights, k=k)
    trainer.run(n_outer)
    _equal(b.params(), a.params())
    assert trainer.d_steps == n_outer * n_d * k and trainer.outer_steps == n_outer
    assert trainer.g_steps == len(seen) == n_outer * n_d * (n_d + 1) // 2
    assert trainer.g_optimizer_steps == 0
    assert [float(w) for w in seen] == [w_list[i] for _ in range(n_outer)
                                        for j in range(1, n_d + 1) for i in range(j)]
    assert _kinds(trainer.schedule()) == _kinds(nested_schedule(n_d, k=k))


def test_trainer_lr_mode_scales_and_restores_lr():
    n_d = 3
    w_list = [2.0, 0.5, 0.125]
    a = TinyGAN()
    opt_ga = torch.optim.Adam(a.G.parameters(), lr=0.01)
    opt_da = torch.optim.SGD(a.D.parameters(), lr=0.1)
    for j in range(1, n_d + 1):
        opt_da.zero_grad()
        a.d_loss().backward()
        opt_da.step()
        for i in range(j):
            opt_ga.param_groups[0]["lr"] = 0.01 * w_list[i]
            opt_ga.zero_grad()
            a.g_loss().backward()
            opt_ga.step()

    b = TinyGAN()
    lr0 = 0.01
    opt_gb = torch.optim.Adam([{"params": list(b.G.parameters())[:2]},
                               {"params": list(b.G.parameters())[2:], "lr": lr0}], lr=lr0)
    originals = [g["lr"] for g in opt_gb.param_groups]
    opt_db = torch.optim.SGD(b.D.parameters(), lr=0.1)
    seen_lr = []

    def g_step(*args):
        assert args == ()  # lr mode passes no weight: it must not be applied twice
        seen_lr.append([g["lr"] for g in opt_gb.param_groups])
        opt_gb.zero_grad()
        b.g_loss().backward()
        opt_gb.step()

    trainer = NestedTrainer(_d_step(b, opt_db), g_step, n_d=n_d, mode="lr",
                            weights=torch.tensor(w_list, dtype=torch.float64),
                            g_optimizer=opt_gb)
    trainer.run_outer()
    _equal(b.params(), a.params())
    assert seen_lr == [[lr0 * w_list[i]] * 2 for j in range(1, n_d + 1) for i in range(j)]
    assert all(g["lr"] is lr for g, lr in zip(opt_gb.param_groups, originals))
    assert trainer.g_steps == 6 and trainer.d_steps == 3


def test_trainer_lr_mode_restores_on_error_and_tensor_lr():
    p = nn.Parameter(torch.zeros(3))
    lr = torch.tensor(0.25, dtype=torch.float64)
    opt = torch.optim.SGD([p], lr=lr)
    calls = []

    def g_step():
        calls.append(float(opt.param_groups[0]["lr"]))
        if len(calls) == 2:
            raise RuntimeError("boom")

    trainer = NestedTrainer(lambda: None, g_step, n_d=2, weights=[4.0, 0.5], mode="lr",
                            g_optimizer=opt)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.run_outer()
    assert calls == [1.0, 1.0]  # 0.25 * w[0] twice (blocks 1 and 2 start with w[0])
    assert opt.param_groups[0]["lr"] is lr and lr.item() == 0.25


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of every gradient it steps with."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.seen = []

    def step(self, closure=None):
        self.seen.append([None if p.grad is None else p.grad.detach().clone()
                          for g in self.param_groups for p in g["params"]])
        return super().step(closure)


@on_accumulate_backends
@pytest.mark.parametrize("weights", [None, [1.0, 0.1, 0.01], "tensor"])
def test_trainer_accumulate_mode_equals_hand_summed_gradients(weights, device, backend):
    n_d = 3
    if weights == "tensor":
        weights = nk.annealed_weights(2.0, 0.2, n_d, dtype=torch.float64)
    w_list = [1.0] * n_d if weights is None else [float(x) for x in weights]

    # Oracle: per block, j losses at the same G, each backward on its own, summed by hand in
    # float64 with the weights; one SGD step with the sum.
    a = TinyGAN(extra_param=True, device=device)
    opt_da = torch.optim.SGD(a.D.parameters(), lr=0.1)
    g_params = list(a.G.parameters())
    expected_grads = []
    for j in range(1, n_d + 1):
        opt_da.zero_grad()
        a.d_loss().backward()
        opt_da.step()
        total = [torch.zeros_like(p) for p in g_params]
        for i in range(j):
            for p in g_params:
                p.grad = None
            a.g_loss().backward()
            for t, p in zip(total, g_params):
                if p.grad is not None:
                    t += w_list[i] * p.grad
        expected_grads.append(total)
        with torch.no_grad():
            for t, p in zip(total, g_params):
                p -= 0.05 * t

    b = TinyGAN(extra_param=True, device=device)
    opt_db = torch.optim.SGD(b.D.parameters(), lr=0.1)
    opt_gb = RecordingSGD(b.G.parameters(), lr=0.05)
    trainer = NestedTrainer(_d_step(b, opt_db), b.g_loss, n_d=n_d, weights=weights,
                            mode="accumulate", g_optimizer=opt_gb)
    trainer.run_outer()
    assert len(opt_gb.seen) == n_d == trainer.g_optimizer_steps
    assert trainer.g_steps == 6
    unused = [i for i, p in enumerate(b.G.parameters()) if p is b.G.unused]
    assert len(unused) == 1
    for got, want in zip(opt_gb.seen, expected_grads):
        for i, (g, e) in enumerate(zip(got, want)):
            if i == unused[0]:
                assert g is None  # no loss reached it: .grad stays None
            else:
                torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)
    for pb, pa in zip(b.G.parameters(), a.G.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-12, atol=1e-14)


@on_accumulate_backends
def test_trainer_accumulate_mode_partial_reach_and_generator_params(device, backend):
    # A parameter reached by only some of a block's losses gets the weighted sum of those.
    torch.manual_seed(0)
    G = nn.Linear(2, 2).double()
    G.extra = nn.Parameter(torch.tensor([1.5], dtype=torch.float64))
    G.to(device)
    extra = G.extra
    x = torch.randn(5, 2, dtype=torch.float64).to(device)
    calls = []

    def g_step():
        calls.append(len(calls))
        loss = G(x).pow(2).sum()
        return loss + extra.sum() ** 2 * len(calls) if len(calls) % 2 == 0 else loss

    opt = RecordingSGD([G.weight, G.bias, extra], lr=0.0)
    NestedTrainer(lambda: None, g_step, n_d=3, weights=[1.0, 10.0, 100.0],
                  mode="accumulate", g_optimizer=opt, generator=G).run_outer()
    # calls numbered 1..6: block 1 = {1}, block 2 = {2, 3}, block 3 = {4, 5, 6};
    # extra is reached by even calls: block 2 call 2 (w=1), block 3 calls 4 (w=1), 6 (w=100).
    g_extra = [s[2] for s in opt.seen]
    assert g_extra[0] is None
    torch.testing.assert_close(
        g_extra[1], torch.tensor([1.0 * 2 * 1.5 * 2], dtype=torch.float64, device=device))
    torch.testing.assert_close(
        g_extra[2], torch.tensor([1.0 * 2 * 1.5 * 4 + 100.0 * 2 * 1.5 * 6], dtype=torch.float64,
                                 device=device)
    )


def test_trainer_bad_input():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="mode"):
        NestedTrainer(lambda: None, lambda w: None, n_d=2, mode="grad")
    with pytest.raises(TypeError, match="g_optimizer"):
        NestedTrainer(lambda: None, lambda: None, n_d=2, mode="lr")
    with pytest.raises(TypeError, match="g_optimizer"):
        NestedTrainer(lambda: None, lambda: None, n_d=2, mode="accumulate", g_optimizer="sgd")
    with pytest.raises(TypeError, match="d_step"):
        NestedTrainer(None, lambda w: None, n_d=2)
    with pytest.raises(ValueError, match="n_d"):
        NestedTrainer(lambda: None, lambda w: None, n_d=0)
    with pytest.raises(ValueError, match="3 entries"):
        NestedTrainer(lambda: None, lambda w: None, n_d=2, weights=[1.0, 0.5, 0.1])
    with pytest.raises(TypeError, match="n_outer"):
        NestedTrainer(lambda: None, lambda w: None, n_d=2).run(1.0)
    with pytest.raises(TypeError, match="0-d tensor"):
        NestedTrainer(lambda: None, lambda: 1.0, n_d=2, mode="accumulate",
                      g_optimizer=opt).run_outer()


# ------------------------------------------------------------------------------ AnnealedCFG

DT = torch.float64
Z = 3


def _mlp_g():
    # BatchNorm makes G's train/eval mode visible. No bias before it: that bias's gradient is 0
    # up to rounding, and RMSprop(eps=1e-18) would turn rounding noise into full-size steps.
    return nn.Sequential(nn.Linear(Z, 16, bias=False), nn.BatchNorm1d(16), nn.Tanh(),
                         nn.Linear(16, 2)).to(DT)


def _mlp_d():
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1)).to(DT)


def _real_batches(count, seed=7, rows=12, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 2, generator=gen, dtype=DT) * 0.3 + 1.0).to(device)
            for _ in range(count)]


class NaiveCFG:
    """The official algorithm written the official way: snapshots as deep copies, the step as
    ``fake.data += eta * w * fake.grad.data`` after ``d_out.backward(ones_like(d_out))``, the
    loss as ``log(1 + exp(.))``, per-batch ``float(loss)`` for the lr rule."""

    def __init__(self, G, D, *, M, eta, w, U, N, x_epochs, lr, bs, scale, decay, redmax, seed,
                 device="cpu"):
        self.G, self.D = G, D
        self.M, self.eta, self.w, self.U, self.N = M, eta, [float(x) for x in w], U, N
        self.x_epochs, self.lr, self.bs, self.scale = x_epochs, lr, bs, scale
        self.decay, self.redmax = decay, redmax
        self.snaps = [copy.deepcopy(D) for _ in range(M)]
        self.opt_d = torch.optim.RMSprop(D.parameters(), lr=lr, alpha=0.95, eps=1e-18)
        self.device = device
        self.rng = torch.Generator(device).manual_seed(seed)
        self.reductions = 0
        self.it = None

    def next_real(self, data):
        if self.it is None:
            self.it = iter(data)
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(data)
            return next(self.it)

    def gen(self, num, t):
        z = torch.randn(num, Z, generator=self.rng, dtype=DT, device=self.device)
        self.G.eval()
        with torch.no_grad():
            fake = self.G(z)
        self.G.train()
        for t0 in range(t):
            fake = fake.detach()
            fake.requires_grad = True
            d_out = self.snaps[t0](fake)
            d_out.backward(torch.ones_like(d_out))
            s = 1.0
            if self.scale == "logd":
                s = torch.sigmoid(-d_out.detach())
            elif self.scale == "js":
                s = torch.sigmoid(d_out.detach())
            fake.data += self.eta * self.w[t0] * s * fake.grad.data
        return fake.detach(), z

    def stage(self, data):
        for t in range(self.M):
            for _ in range(self.U):
                real = self.next_real(data)
                fake, _ = self.gen(real.shape[0], t)
                loss = (torch.log(1 + torch.exp(-self.D(real)))
                        + torch.log(1 + torch.exp(self.D(fake)))).mean()
                loss.backward()
                self.opt_d.step()
                self.opt_d.zero_grad()
            self.snaps[t].load_state_dict(self.D.state_dict())
        fakes, zs = [], []
        for start in range(0, self.N, self.bs):
            f, z = self.gen(min(self.bs, self.N - start), self.M)
            fakes.append(f)
            zs.append(z)
        fakes, zs = torch.cat(fakes), torch.cat(zs)
        opt = torch.optim.RMSprop(self.G.parameters(), lr=self.lr, alpha=0.95, eps=1e-18)
        last, red = 99999999.0, 0
        for _ in range(self.x_epochs):
            perm = torch.randperm(self.N, generator=self.rng, device=self.device)
            losses = []
            for start in range(0, self.N, self.bs):
                idx = perm[start:start + self.bs]
                loss = ((self.G(zs[idx]) - fakes[idx]) ** 2).sum() / 2 / len(idx)
                losses.append(float(loss.detach()))
                loss.backward()
                opt.step()
                opt.zero_grad()
            mean = sum(losses) / len(losses)
            if mean > last and self.decay > 0 and (self.redmax is None or red < self.redmax):
                for g in opt.param_groups:
                    g["lr"] *= self.decay
                red += 1
            last = mean
        self.reductions += red


CFG_ARGS = dict(M=3, eta=0.4, U=2, N=20, x_epochs=4, batch_size=8)


def _pair(scale="kl", lr=2e-3, decay=0.1, redmax=3, weights="annealed", device="cpu"):
    torch.manual_seed(3)
    G, D = _mlp_g().to(device), _mlp_d().to(device)
    w = nk.annealed_weights(1.0, 0.01, 3, dtype=DT) if weights == "annealed" else weights
    cfg = AnnealedCFG(copy.deepcopy(G), copy.deepcopy(D), weights=w, lr=lr, z_dim=Z,
                      scale=scale, approx_decay=decay, approx_redmax=redmax,
                      rng=torch.Generator(device).manual_seed(11), **CFG_ARGS)
    a = CFG_ARGS
    naive = NaiveCFG(G, D, M=a["M"], eta=a["eta"], w=torch.ones(3) if w is None else w,
                     U=a["U"], N=a["N"], x_epochs=a["x_epochs"], lr=lr, bs=a["batch_size"],
                     scale=scale, decay=decay, redmax=redmax, seed=11, device=device)
    return cfg, naive


def _close_modules(m1, m2, what):
    for (name, x), (_, y) in zip(m1.state_dict().items(), m2.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11,
                                   msg=lambda m, name=name: f"{what}.{name}: {m}")


@on_cfg_backends
@pytest.mark.parametrize("scale,lr", [("kl", 2e-3), ("logd", 5e-2), ("js", 2e-3)])
def test_annealed_cfg_two_stages_match_naive_loop(scale, lr, device, backend):
    cfg, naive = _pair(scale=scale, lr=lr, device=device)
    # stage 2 wraps around the list
    data = _real_batches(CFG_ARGS["M"] * CFG_ARGS["U"] + 2, device=device)
    for _ in range(2):
        cfg.train_stage(data)
        naive.stage(data)
    assert cfg.stage == 2
    _close_modules(cfg.generator, naive.G, "G")
    _close_modules(cfg.discriminator, naive.D, "D")
    for m, (s1, s2) in enumerate(zip(cfg.snapshots, naive.snaps)):
        _close_modules(s1, s2, f"snapshot{m}")
    # Snapshots differ from each other (each is D at its own time) and the last one is D now.
    assert not torch.equal(cfg.snapshots[0][0].weight, cfg.snapshots[1][0].weight)
    torch.testing.assert_close(cfg.snapshots[-1][0].weight, cfg.discriminator[0].weight)
    if scale == "logd":  # the large lr makes an epoch's loss go up: the lr rule is exercised
        assert naive.reductions > 0
    x = cfg.generate(9)
    y, _ = naive.gen(9, 3)
    assert x.shape == (9, 2) and x.dtype == DT and x.device.type == device
    assert not x.requires_grad and cfg.generator.training
    torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)


@on_cfg_backends
def test_annealed_cfg_plain_weights_none_equals_ones_and_lr_rule_off(device, backend):
    cfg_none, naive = _pair(weights=None, decay=0.0, device=device)
    cfg_ones, _ = _pair(weights=[1.0, 1.0, 1.0], decay=0.0, device=device)
    data = _real_batches(6, device=device)
    cfg_none.train_stage(data)
    cfg_ones.train_stage(iter(data))  # a one-shot iterator of exactly M * U batches is enough
    naive.stage(data)
    _close_modules(cfg_none.generator, naive.G, "G")
    _close_modules(cfg_ones.generator, naive.G, "G")
    assert cfg_none.last_approx_loss.dim() == 0 and cfg_none.last_d_loss.dim() == 0


@on_cfg_aw_backends
def test_annealed_cfg_d_backward_hook(device, backend):
    """d_backward gets D's two logistic terms and the logits of each step; one that reproduces
    the default backward reproduces the default stage, and AWLoss.backward plugs in."""
    cfg, naive = _pair(device=device)
    seen = []

    def plain(loss_real, loss_fake, real_logits, fake_logits):
        torch.testing.assert_close(loss_real, F.softplus(-real_logits).mean())
        torch.testing.assert_close(loss_fake, F.softplus(fake_logits).mean())
        seen.append(real_logits.shape[0])
        loss = loss_real + loss_fake
        loss.backward()
        return loss.detach()

    cfg.d_backward = plain
    data = _real_batches(CFG_ARGS["M"] * CFG_ARGS["U"], device=device)
    cfg.train_stage(data)
    naive.stage(data)
    assert seen == [12] * (CFG_ARGS["M"] * CFG_ARGS["U"])
    _close_modules(cfg.generator, naive.G, "G")
    _close_modules(cfg.discriminator, naive.D, "D")

    aw_cfg, _ = _pair(device=device)
    aw = AWLoss(aw_cfg.discriminator)
    aw_cfg.d_backward = aw.backward
    aw_cfg.train_stage(data)
    assert aw.last_case is not None and 1 <= int(aw.last_case) <= 5
    assert not torch.equal(aw_cfg.discriminator[0].weight, cfg.discriminator[0].weight)
    with pytest.raises(TypeError, match="d_backward must be callable"):
        AnnealedCFG(_mlp_g(), _mlp_d(), M=2, eta=1.0, weights=None, z_dim=Z, d_backward=3)


@on_cfg_backends
def test_annealed_cfg_generate_batches_and_state_dict_round_trip(device, backend):
    cfg, _ = _pair(device=device)
    data = _real_batches(8, device=device)
    cfg.train_stage(data)
    state = copy.deepcopy(cfg.state_dict())
    assert state["stage"] == 1 and len(state["snapshots"]) == 3

    torch.manual_seed(99)  # other initial weights, to be overwritten
    other = AnnealedCFG(_mlp_g().to(device), _mlp_d().to(device), weights=[5.0, 4.0, 3.0],
                        lr=2e-3, z_dim=Z, rng=torch.Generator(device).manual_seed(11),
                        **{**CFG_ARGS, "eta": 1.0})
    other.load_state_dict(state)
    assert other.stage == 1 and other.eta == cfg.eta
    torch.testing.assert_close(other.weights, cfg.weights)
    for s1, s2 in zip(other.snapshots, cfg.snapshots):
        _close_modules(s1, s2, "snapshot")
    cfg.rng.manual_seed(5)
    other.rng.manual_seed(5)
    x, z = cfg.generate(10, batch_size=4, return_z=True)
    assert x.shape == (10, 2) and z.shape == (10, Z)
    torch.testing.assert_close(other.generate(10, batch_size=4), x, rtol=0, atol=0)
    # One more stage from identical states (incl. D's RMSprop state) stays identical. The
    # position in the data is the caller's: both get a new list.
    more = _real_batches(6, seed=8, device=device)
    cfg.train_stage(more)
    other.train_stage(more)
    _close_modules(other.generator, cfg.generator, "G")
    _close_modules(other.discriminator, cfg.discriminator, "D")
    with pytest.raises(ValueError, match="snapshots"):
        AnnealedCFG(_mlp_g(), _mlp_d(), M=2, eta=1.0, weights=None, z_dim=Z).load_state_dict(
            state)


def test_annealed_cfg_bad_input():
    G, D = _mlp_g(), _mlp_d()
    ok = dict(eta=0.5, weights=None, z_dim=Z, M=3)
    with pytest.raises(ValueError, match="M = 3"):
        AnnealedCFG(G, D, **{**ok, "weights": [1.0, 0.5]})
    with pytest.raises(ValueError, match=r"shape \(M,\)"):
        AnnealedCFG(G, D, **{**ok, "weights": torch.ones(4)})
    with pytest.raises(ValueError, match="positive"):
        AnnealedCFG(G, D, **{**ok, "weights": [1.0, -0.5, 0.1]})
    with pytest.raises(ValueError, match="eta"):
        AnnealedCFG(G, D, **{**ok, "eta": 0.0})
    with pytest.raises(TypeError, match="eta"):
        AnnealedCFG(G, D, **{**ok, "eta": torch.tensor(0.5)})
    with pytest.raises(ValueError, match="scale"):
        AnnealedCFG(G, D, **{**ok, "scale": "wgan"})
    with pytest.raises(TypeError, match="weights"):
        AnnealedCFG(G, D, **{**ok, "weights": "ones"})
    with pytest.raises(ValueError, match="approx_decay"):
        AnnealedCFG(G, D, **{**ok, "approx_decay": 1.0})
    with pytest.raises(TypeError, match="discriminator"):
        AnnealedCFG(G, lambda x: x, **ok)
    with pytest.raises(ValueError, match="meta"):
        AnnealedCFG(G, _mlp_d().to("meta"), **ok)
    cfg = AnnealedCFG(G, D, **ok)
    with pytest.raises(RuntimeError, match="ran out"):
        cfg.train_stage(iter(_real_batches(2)))  # needs M * U = 3
    with pytest.raises(TypeError, match="tensors"):
        AnnealedCFG(G, D, **ok).train_stage([[None]] * 6)
    patch_d = nn.Sequential(nn.Linear(2, 3)).to(DT)  # 3 outputs per sample
    with pytest.raises(ValueError, match="one discriminator output per sample"):
        AnnealedCFG(G, patch_d, **{**ok, "scale": "js"}).generate(4)


# ------------------------------------------------------------------------ Technique 1 / presets


@on_median_backends
def test_initial_weight_distances_match_cdist_median(device, backend):
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(37, 3, 2, 2, generator=gen, dtype=torch.float64).to(device)  # image-shaped
    fake = (0.5 * torch.randn(23, 3, 2, 2, generator=gen, dtype=torch.float64) + 1.0).to(device)
    d1, d2 = initial_weight_distances(real, fake)
    full = torch.cdist(real.flatten(1), real.flatten(1))
    iu = torch.triu_indices(37, 37, offset=1)
    want1 = torch.median(full[iu[0], iu[1]])
    want2 = torch.median(torch.cdist(real.flatten(1), fake.flatten(1)).flatten())
    assert d1.dim() == 0 and d2.dim() == 0 and d1.dtype == torch.float64
    torch.testing.assert_close(d1, want1, rtol=1e-12, atol=0)
    torch.testing.assert_close(d2, want2, rtol=1e-12, atol=0)
    assert d2 > d1  # the shifted fake set is farther away than the real pairs


def test_initial_weight_distances_bad_input():
    real = torch.randn(8, 4)
    with pytest.raises(ValueError, match="feature shape"):
        initial_weight_distances(real, torch.randn(8, 5))
    with pytest.raises(TypeError, match="dtype"):
        initial_weight_distances(real, torch.randn(8, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="real"):
        initial_weight_distances(real.long(), torch.randn(8, 4))
    with pytest.raises(ValueError, match="at least 2"):
        initial_weight_distances(real[:1], torch.randn(8, 4))
    with pytest.raises(ValueError, match="meta"):
        initial_weight_distances(real, torch.randn(8, 4, device="meta"))


@pytest.mark.parametrize(
    "resolution,nearest,expected",
    [
        (32, False, (1.0, 0.01)),
        (64, False, (1.0, 0.01)),
        (127, False, (1.0, 0.01)),
        ((64, 64), False, (1.0, 0.01)),
        ((96, 128), False, (1.0, 0.01)),  # sqrt(96 * 128) = 110.9
        (256, False, (20.0, 1.0)),
        ((256, 256), False, (20.0, 1.0)),
        (128, True, (1.0, 0.01)),
        (181, True, (1.0, 0.01)),
        (182, True, (20.0, 1.0)),
        (512, True, (20.0, 1.0)),
        (64, True, (1.0, 0.01)),
    ],
)
def test_preset_weights(resolution, nearest, expected):
    assert preset_weights(resolution, nearest=nearest) == expected


@pytest.mark.parametrize(
    "resolution,err,match",
    [
        (128, ValueError, "nearest=True"),
        (200, ValueError, "not for 200"),
        (512, ValueError, "256x256"),
        ((128, 256), ValueError, "nearest"),
        (0, ValueError, "positive"),
        (64.0, TypeError, "int"),
        (True, TypeError, "int"),
        ("64", TypeError, "int"),
        ((64, 64, 3), ValueError, "pair"),
    ],
)
def test_preset_weights_bad_input(resolution, err, match):
    with pytest.raises(err, match=match):
        preset_weights(resolution)
