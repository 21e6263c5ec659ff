"""BRC (design §5, §7.2) against an oracle written here that takes each gradient with its own
``torch.autograd.grad`` call and applies eq. 9 in float64 on the host. Everything runs in float64
so the comparison is tight.

Every test that reaches an op runs once per backend that implements the scheme's ops
(multi_dot, iga_ratio, iga_correction_; ``helpers.cases``: reference and cpu on CPU tensors,
triton and cuda on CUDA tensors, triton on CPU tensors under TRITON_INTERPRET=1), so the
reference kernels are checked here too and not only the one ``auto`` picks. Tests of pure
argument checking and of the meta device run once.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as nnf
from helpers import cases
from schemenets import (
    F64,
    HandsD,
    MixedD,
    PartialD,
    assert_own_grads,
    bce,
    close,
    conv_d,
    mlp,
    rand,
)
from torch import nn

from nats_kernels.schemes import BRC

pytestmark = pytest.mark.single_thread

on_brc_backends = pytest.mark.parametrize("device,backend",
                                          cases("multi_dot", "iga_ratio", "iga_correction_"))


def brc_oracle(G, D, F, f, eps=1e-12):
    """Eq. 9 from four separate autograd calls, r in float64 on the host. Returns (r, grads)
    where grads[i] is None for a generator parameter neither loss depends on."""
    p_d = [p for p in D.parameters() if p.requires_grad]
    p_g = [p for p in G.parameters() if p.requires_grad]

    def grads(loss, params):
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)], gs

    (gf_d, _), (gF_d, _) = grads(f, p_d), grads(F, p_d)
    (gf_g, raw_f), (gF_g, raw_F) = grads(f, p_g), grads(F, p_g)
    a = torch.cat([g.reshape(-1) for g in gf_d]).double()
    b = torch.cat([g.reshape(-1) for g in gF_d]).double()
    r = torch.dot(a, b).item() / (torch.dot(a, a).item() + eps)
    out = [None if x is None and y is None else gF - r * gf
           for x, y, gF, gf in zip(raw_F, raw_f, gF_g, gf_g)]
    return r, out


def conv_g(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 64), nn.LeakyReLU(0.2), nn.Unflatten(1, (1, 8, 8))).double()


BRC_NETS = {
    "mlp": (lambda: mlp(4, 2, seed=1), lambda: mlp(2, 1, seed=2), (16, 2), (16, 4)),
    "conv": (conv_g, conv_d, (6, 1, 8, 8), (6, 4)),
}


def vgan(D, real, fake):
    """Non-saturating generator loss F and the BCE discriminator loss f on the same fake."""
    fake_logits = D(fake)
    F = nnf.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    return F, sum(bce(D(real), fake_logits))


def wgan(D, real, fake):
    fake_logits = D(fake)
    return -fake_logits.mean(), fake_logits.mean() - D(real).mean()


BRC_LOSSES = {"vgan": vgan, "wgan": wgan}


def brc_setup(net, seed=0, device="cpu"):
    make_g, make_d, real_shape, z_shape = BRC_NETS[net]
    G, D = make_g().to(device), make_d().to(device)
    real = rand(*real_shape, seed=seed, device=device)
    z = rand(*z_shape, seed=seed + 1, device=device)
    return G, D, real, z


@on_brc_backends
@pytest.mark.parametrize("loss", BRC_LOSSES)
@pytest.mark.parametrize("net", BRC_NETS)
def test_brc_matches_separate_autograd_calls(net, loss, device, backend):
    G, D, real, z = brc_setup(net, device=device)
    e_r, expected = brc_oracle(G, D, *BRC_LOSSES[loss](D, real, G(z)))
    # stale discriminator gradients: must come back untouched (same tensors, same values)
    sentinels = {}
    for i, p in enumerate(D.parameters()):
        if i % 2 == 0:
            sentinels[i] = p.grad = rand(*p.shape, seed=50 + i, device=device)
    before = {i: t.clone() for i, t in sentinels.items()}
    brc = BRC(G, D)
    assert brc.last_ratio is None and repr(brc) == "BRC(eps=1e-12)"
    r = brc.backward(*BRC_LOSSES[loss](D, real, G(z)))
    assert brc.last_ratio is r
    assert r.shape == () and not r.requires_grad and r.dtype == F64
    close(r, torch.tensor(e_r, dtype=F64), "r")
    for p, e in zip(G.parameters(), expected):
        close(p.grad, e, "generator grad")
    assert_own_grads(G)
    for i, p in enumerate(D.parameters()):
        if i in sentinels:
            assert p.grad is sentinels[i] and torch.equal(p.grad, before[i])
        else:
            assert p.grad is None


@on_brc_backends
def test_brc_matches_specs_three_pass_evaluation(device, backend):
    # design §5: dF/dD and df/dD stopping at D, r, then one backward of F - r f into G only.
    G, D, real, z = brc_setup("mlp", seed=3, device=device)
    F, f = vgan(D, real, G(z))
    p_d = list(D.parameters())
    gf = torch.autograd.grad(f, p_d, retain_graph=True)
    gF = torch.autograd.grad(F, p_d, retain_graph=True)
    r = sum((a * b).sum() for a, b in zip(gf, gF)) / (sum((a * a).sum() for a in gf) + 1e-12)
    (F - r.detach() * f).backward(inputs=list(G.parameters()))
    expected = [p.grad.clone() for p in G.parameters()]
    G.zero_grad()
    got_r = BRC(G, D).backward(*vgan(D, real, G(z)))
    close(got_r, r, "r")
    for p, e in zip(G.parameters(), expected):
        close(p.grad, e, "generator grad")


@on_brc_backends
def test_brc_pure_zero_sum_gives_r_minus_one_and_zero_gradient(device, backend):
    G, D, real, z = brc_setup("mlp", seed=1, device=device)
    fake_logits = D(G(z))
    f = fake_logits.mean()  # no real term
    F = -fake_logits.mean()
    r = BRC(G, D, eps=0).backward(F, f)
    assert r.item() == -1.0
    for p in G.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p)), "generator gradient must vanish"
    # with the default eps, r = -S/(S + 1e-12): the update (1 + r) dF/dG is negligible
    G.zero_grad()
    fake_logits = D(G(z))
    dF = torch.autograd.grad(-fake_logits.mean(), list(G.parameters()), retain_graph=True)
    r = BRC(G, D).backward(-fake_logits.mean(), fake_logits.mean())
    assert -1 < r.item() < -1 + 1e-9
    for p, g in zip(G.parameters(), dF):
        assert p.grad.abs().max() <= 1e-9 * g.abs().max()


@on_brc_backends
@pytest.mark.parametrize("net", BRC_NETS)
def test_brc_zero_sum_fake_term_scales_generator_gradient_by_one_plus_r(net, device, backend):
    G, D, real, z = brc_setup(net, seed=2, device=device)
    e_r, _ = brc_oracle(G, D, *wgan(D, real, G(z)))
    F, _ = wgan(D, real, G(z))
    dF = torch.autograd.grad(F, list(G.parameters()))
    r = BRC(G, D).backward(*wgan(D, real, G(z)))
    assert abs(e_r) > 1e-3 and abs(1 + e_r) > 1e-3, "the real term must make r non-trivial"
    close(r, torch.tensor(e_r, dtype=F64), "r")
    for p, g in zip(G.parameters(), dF):
        close(p.grad, (1 + r) * g, "(1 + r) dF/dG")


@on_brc_backends
def test_brc_update_invariant_to_the_sign_of_f(device, backend):
    G, D, real, z = brc_setup("mlp", seed=4, device=device)
    r = BRC(G, D).backward(*vgan(D, real, G(z)))
    plus = [p.grad.clone() for p in G.parameters()]
    G.zero_grad()
    F, f = vgan(D, real, G(z))
    r_minus = BRC(G, D).backward(F, -f)
    close(r_minus, -r, "r flips with f")
    for p, e in zip(G.parameters(), plus):
        close(p.grad, e, "same update")


@on_brc_backends
def test_brc_accumulates_into_existing_generator_grad(device, backend):
    G, D, real, z = brc_setup("conv", seed=5, device=device)
    _, expected = brc_oracle(G, D, *vgan(D, real, G(z)))
    olds = [rand(*p.shape, seed=70 + i, device=device) for i, p in enumerate(G.parameters())]
    # a stale gradient that cannot take an in-place add (expanded) is replaced by the sum
    olds[0] = torch.full((), 3.0, dtype=F64, device=device).expand(olds[0].shape)
    for p, o in zip(G.parameters(), olds):
        p.grad = o
    before = [o.clone() for o in olds]
    BRC(G, D).backward(*vgan(D, real, G(z)))
    for i, (p, o, b, e) in enumerate(zip(G.parameters(), olds, before, expected)):
        assert (p.grad is o) == (i != 0), "accumulated in place, as backward() does"
        close(p.grad, b + e, "old + new")
    assert_own_grads(G)


@on_brc_backends
def test_brc_stale_generator_grad_that_is_part_of_a_graph(device, backend):
    G, D, real, z = brc_setup("mlp", seed=6, device=device)
    _, expected = brc_oracle(G, D, *vgan(D, real, G(z)))
    G.zero_grad()
    params = list(G.parameters())
    grads = torch.autograd.grad(nnf.softplus(-D(G(z))).mean(), params, create_graph=True)
    for p, g in zip(params, grads):
        p.grad = g
    before = [p.grad.detach().clone() for p in G.parameters()]
    BRC(G, D).backward(*vgan(D, real, G(z)))
    for p, b, e in zip(G.parameters(), before, expected):
        assert not p.grad.requires_grad and p.grad.grad_fn is None
        close(p.grad, b + e, "old + new")
        p.grad = None  # drop the create_graph graph


class PartialG(nn.Module):
    """Generator parameters in every role: used by both losses through the fake batch (``net``),
    by F only (``f_free``), by f only (``f_only``), by neither (``unused``), frozen (``frozen``),
    and two that receive one shared gradient tensor (``a``, ``b``)."""

    def __init__(self):
        super().__init__()
        self.net = mlp(4, 2, width=8, seed=7)
        self.f_free = nn.Parameter(rand(2, seed=1))
        self.f_only = nn.Parameter(rand(2, seed=2))
        self.unused = nn.Parameter(rand(3, seed=3))
        self.frozen = nn.Parameter(rand(2, seed=4), requires_grad=False)
        self.a = nn.Parameter(rand(2, seed=5))
        self.b = nn.Parameter(rand(2, seed=6))

    def forward(self, z):
        return self.net(z) * (self.a + self.b) + self.frozen


def partial_losses(G, D, real, z):
    fake = G(z)
    fake_logits = D(fake, False)
    F = nnf.softplus(-fake_logits).mean() + 0.5 * G.f_free.sum()  # an expanded dF/df_free
    real_logits = D(real, True)
    f = sum(bce(real_logits, fake_logits)) + 0.1 * (G.f_only ** 2).sum()
    return F, f


@on_brc_backends
def test_brc_parameters_in_every_role(device, backend):
    G, D = PartialG().to(device), PartialD(seed=3).to(device)
    real, z = rand(16, 2, seed=8, device=device), rand(16, 4, seed=9, device=device)
    e_r, expected = brc_oracle(G, D, *partial_losses(G, D, real, z))
    G.unused.grad = stale = rand(3, seed=10, device=device)
    stale_copy = stale.clone()
    r = BRC(G, D).backward(*partial_losses(G, D, real, z))
    close(r, torch.tensor(e_r, dtype=F64), "r")
    trainable = [(n, p) for n, p in G.named_parameters() if p.requires_grad]
    for (name, p), e in zip(trainable, expected):
        if name == "unused":
            assert e is None and p.grad is stale and torch.equal(p.grad, stale_copy)
        else:
            close(p.grad, e, f"{name}.grad")
    close(G.f_only.grad, -r * 0.2 * G.f_only.detach(), "f only: -r df/dG")
    assert_own_grads(G)
    assert G.frozen.grad is None
    assert all(p.grad is None for p in D.parameters())


@on_brc_backends
def test_brc_leaves_tensors_it_does_not_own_alone(device, backend):
    G = HandsD().to(device)  # G maps a (B, 2) batch to (B, 1) "samples"
    D = mlp(1, 1, seed=3).to(device)
    real, z = rand(16, 1, seed=1, device=device), rand(16, 2, seed=2, device=device)
    _, expected = brc_oracle(G, D, *vgan(D, real, G(z)))
    given = G.given.clone()
    G.p1.grad = G.given  # a stale .grad that is also p2's gradient in both passes
    kept = []
    G.lin.weight.register_hook(lambda g: kept.append((g, g.clone())))
    BRC(G, D).backward(*vgan(D, real, G(z)))
    assert torch.equal(G.given, given)
    assert len(kept) == 2 and all(torch.equal(g, value) for g, value in kept)
    for name, p in G.named_parameters():
        e = expected[[n for n, _ in G.named_parameters()].index(name)]
        close(p.grad, e + given if name == "p1" else e, f"{name}.grad")
    assert_own_grads(G)


@on_brc_backends
def test_brc_mixed_dtype_discriminator(device, backend):
    G, D = mlp(4, 2, seed=1).to(device), MixedD().to(device)
    real, z = rand(16, 2, device=device), rand(16, 4, seed=1, device=device)
    e_r, expected = brc_oracle(G, D, *vgan(D, real, G(z)))
    r = BRC(G, D).backward(*vgan(D, real, G(z)))
    assert r.dtype == F64
    torch.testing.assert_close(r.item(), e_r, rtol=1e-5, atol=1e-7)
    for p, e in zip(G.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)


def test_brc_reads_no_value_on_the_host():
    # On the meta device every .item(), bool(t), float(t), .cpu() value read raises.
    with torch.device("meta"):
        D, G = mlp(2, 1).to("meta"), mlp(2, 2).to("meta")
        real, z = torch.randn(8, 2), torch.randn(8, 2)
    fake_logits = D(G(z))
    r = BRC(G, D).backward(nnf.softplus(-fake_logits).mean(), sum(bce(D(real), fake_logits)))
    assert r.device.type == "meta" and r.shape == ()
    assert all(p.grad is not None for p in G.parameters())


def test_brc_rejects_a_detached_fake_batch():
    G, D, real, z = brc_setup("mlp")
    fake = G(z)
    F = nnf.softplus(-D(fake)).mean()
    f = sum(bce(D(real), D(fake.detach())))  # the common mistake
    with pytest.raises(ValueError, match=r"without \.detach\(\)"):
        BRC(G, D).backward(F, f)
    assert all(p.grad is None for p in G.parameters())
    F.backward()  # F's graph is intact after the error


def test_brc_rejects_bad_construction():
    G, D = mlp(4, 2), mlp(2, 1)
    with pytest.raises(TypeError, match="generator"):
        BRC(list(G.parameters()), D)
    with pytest.raises(TypeError, match="discriminator"):
        BRC(G, None)
    shared = nn.Sequential(G, D[0])
    with pytest.raises(ValueError, match=r"share parameter\(s\) 1\.weight, 1\.bias"):
        BRC(shared, D)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        BRC(G, D, eps=-1e-3)
    with pytest.raises(ValueError, match="eps must be finite"):
        BRC(G, D, eps=math.nan)
    with pytest.raises(TypeError, match="eps"):
        BRC(G, D, eps=torch.tensor(1e-12))
    with pytest.raises(ValueError, match="generator has no parameter with requires_grad"):
        BRC(mlp(4, 2).requires_grad_(False), D)


def test_brc_rejects_bad_calls():
    G, D, real, z = brc_setup("mlp")
    brc = BRC(G, D)
    F, f = vgan(D, real, G(z))
    with pytest.raises(ValueError, match="F must be a scalar"):
        brc.backward(nnf.softplus(-D(G(z))), f)
    with pytest.raises(ValueError, match="f does not require grad"):
        brc.backward(F, f.detach())
    with pytest.raises(TypeError, match="f must have a floating dtype"):
        brc.backward(F, torch.ones((), dtype=torch.int64))
    with pytest.raises(ValueError, match="F is on meta"):
        brc.backward(torch.ones((), device="meta", requires_grad=True), f)
    with pytest.raises(ValueError, match="F does not depend on any trainable parameter of the gen"):
        brc.backward(D(real).mean(), f)
    with pytest.raises(ValueError, match="f does not depend on any trainable parameter of the dis"):
        brc.backward(F, (G(z) ** 2).mean())
    D.requires_grad_(False)
    with pytest.raises(ValueError, match="discriminator has no parameter with requires_grad"):
        brc.backward(F, f)
    D.requires_grad_(True)
    assert all(p.grad is None for p in G.parameters())
    assert all(p.grad is None for p in D.parameters())
