"""The sanity properties of design §5 (BRC / IGA) on tiny GANs, through iga_ratio and
iga_correction_ on every backend that implements them: in a zero-sum game the corrected
generator gradient is (1 + r) dF/dG, a pure zero-sum game cancels it, and the update does not
depend on the sign convention of f. The expectations are float64 expressions of separate
``torch.autograd.grad`` calls.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, cases

import nats_kernels as nk

pytestmark = pytest.mark.single_thread


def mlp(sizes, dtype, seed):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layers = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(torch.nn.Linear(n_in, n_out))
            if i < len(sizes) - 2:
                layers.append(torch.nn.LeakyReLU(0.2))
        return torch.nn.Sequential(*layers).to(dtype)


def tiny_gan(dtype, device, seed=0):
    G = mlp([3, 8, 2], dtype, seed).to(device)
    D = mlp([2, 16, 8, 1], dtype, seed + 1).to(device)
    gen = torch.Generator().manual_seed(seed + 2)
    z = torch.randn(32, 3, generator=gen, dtype=dtype).to(device)
    real = (torch.randn(32, 2, generator=gen, dtype=dtype) * 0.3 + 1.0).to(device)
    return G, D, z, real


def losses(kind, G, D, z, real):
    """(f, F): the discriminator loss (minimized by D) and the generator loss, on the same,
    non-detached fake batch. For these kinds F = -(fake term of f)."""
    fake = G(z)
    d_fake = D(fake)
    if kind == "wgan":
        fake_term = d_fake.mean()
        real_term = -D(real).mean()
    elif kind == "saturating":  # BCE discriminator loss; the saturating generator loss
        fake_term = -F.logsigmoid(-d_fake).mean()  # -log(1 - sigmoid(D(G(z))))
        real_term = -F.logsigmoid(D(real)).mean()
    elif kind == "hinge":
        fake_term = F.relu(1 + d_fake).mean()
        real_term = F.relu(1 - D(real)).mean()
    else:
        raise AssertionError(kind)
    return real_term + fake_term, -fake_term


def grads(loss, params):
    return list(torch.autograd.grad(loss, params, retain_graph=True))


def flat64(gs):
    return torch.cat([g.double().flatten() for g in gs])


ZERO_SUM_KINDS = ["wgan", "saturating", "hinge"]


@pytest.mark.parametrize("device,backend", cases("iga_ratio", "iga_correction_"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ZERO_SUM_KINDS)
def test_brc_zero_sum_update_is_one_plus_r_times_dF(device, backend, dtype, kind):
    """f depends on theta_G only through its fake term and F = -(fake term of f), so
    df/dG = -dF/dG and the corrected gradient dF/dG - r df/dG is (1 + r) dF/dG."""
    G, D, z, real = tiny_gan(dtype, device)
    f, F_ = losses(kind, G, D, z, real)
    pG, pD = list(G.parameters()), list(D.parameters())
    gf_D, gF_D, gf_G, gF_G = grads(f, pD), grads(F_, pD), grads(f, pG), grads(F_, pG)
    for a, b in zip(gf_G, gF_G):
        assert_close(a, -b.double(), dtype, "df/dG = -dF/dG")

    r = nk.iga_ratio(gf_D, gF_D)
    assert r.dtype == dtype and r.shape == ()
    a, b = flat64(gf_D), flat64(gF_D)
    r64 = torch.dot(a, b) / (torch.dot(a, a) + 1e-12)
    assert_close(r, r64, dtype, "r vs separate autograd.grad calls")
    assert float(r64) != -1.0  # the real term makes this a non-degenerate check

    corrected = [g.clone() for g in gF_G]
    nk.iga_correction_(corrected, gf_G, r)
    for p, (c, g) in enumerate(zip(corrected, gF_G)):
        assert_close(c, (1 + r.double()) * g.double(), dtype, f"(1 + r) dF/dG [{p}]")

    # design §5.3's cost-efficient evaluation: one backward of F - r.detach() f into theta_G.
    one_pass = torch.autograd.grad(F_ - r.detach() * f, pG, retain_graph=True)
    for p, (c, g) in enumerate(zip(corrected, one_pass)):
        assert_close(c, g.double(), dtype, f"one backward of F - r f [{p}]")


@pytest.mark.parametrize("device,backend", cases("iga_ratio", "iga_correction_"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ZERO_SUM_KINDS)
def test_brc_pure_zero_sum_cancels(device, backend, dtype, kind):
    """No real term and F = -f: r = -1 and the corrected generator gradient is zero."""
    G, D, z, real = tiny_gan(dtype, device, seed=5)
    _, F_ = losses(kind, G, D, z, real)
    f = -F_
    pG, pD = list(G.parameters()), list(D.parameters())
    gf_D, gF_D, gf_G, gF_G = grads(f, pD), grads(F_, pD), grads(f, pG), grads(F_, pG)
    norm2 = float(torch.dot(flat64(gf_D), flat64(gf_D)))
    assert norm2 > 1e-2 and any(g.abs().max() > 1e-3 for g in gF_G)

    # eps = 0: r is exactly the ratio of a squared norm and its negative.
    r = nk.iga_ratio(gf_D, gF_D, eps=0.0)
    assert_close(r, torch.tensor(-1.0, dtype=torch.float64), dtype, "r, eps=0")
    corrected = [g.clone() for g in gF_G]
    nk.iga_correction_(corrected, gf_G, r)
    for p, c in enumerate(corrected):
        assert_close(c, torch.zeros_like(c, dtype=torch.float64), dtype, f"zero update [{p}]")

    # The default eps (1e-12) moves r off -1 by eps / <gf, gf> only.
    r = nk.iga_ratio(gf_D, gF_D)
    assert_close(r, torch.tensor(-1.0, dtype=torch.float64), dtype, "r, default eps")
    assert_close(r, torch.tensor(-norm2 / (norm2 + 1e-12), dtype=torch.float64), dtype, "r formula")
    corrected = [g.clone() for g in gF_G]
    nk.iga_correction_(corrected, gf_G, r)
    for p, (c, g) in enumerate(zip(corrected, gF_G)):
        assert_close(c, torch.zeros_like(c, dtype=torch.float64), dtype, f"~zero update [{p}]")
        assert_close(c, (1 + r.double()) * g.double(), dtype, f"(1 + r) dF/dG [{p}]")


@pytest.mark.parametrize("device,backend", cases("iga_ratio", "iga_correction_"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ZERO_SUM_KINDS + ["non-saturating"])
def test_brc_sign_convention_of_f(device, backend, dtype, kind):
    """design §5: "r is invariant to the sign convention of f (maximize f or minimize -f give the
    same update)". Precisely: flipping f's sign flips df/dD and df/dG, hence r's sign, and the
    update dF/dG - r df/dG stays the same."""
    G, D, z, real = tiny_gan(dtype, device, seed=9)
    if kind == "non-saturating":  # not zero-sum: F = -log sigmoid(D(G(z)))
        f, _ = losses("saturating", G, D, z, real)
        F_ = -F.logsigmoid(D(G(z))).mean()
    else:
        f, F_ = losses(kind, G, D, z, real)
    pG, pD = list(G.parameters()), list(D.parameters())
    gF_D, gF_G = grads(F_, pD), grads(F_, pG)

    updates, ratios = [], []
    for sign in (1.0, -1.0):
        g_f = sign * f  # minimize f, or maximize -f: the same discriminator
        gf_D, gf_G = grads(g_f, pD), grads(g_f, pG)
        r = nk.iga_ratio(gf_D, gF_D)
        a, b = flat64(gf_D), flat64(gF_D)
        assert_close(r, torch.dot(a, b) / (torch.dot(a, a) + 1e-12), dtype, f"r, sign {sign}")
        corrected = [g.clone() for g in gF_G]
        nk.iga_correction_(corrected, gf_G, r)
        expected = [x.double() - r.double() * y.double() for x, y in zip(gF_G, gf_G)]
        for p, (c, e) in enumerate(zip(corrected, expected)):
            assert_close(c, e, dtype, f"update, sign {sign} [{p}]")
        updates.append(corrected)
        ratios.append(r)
    assert_close(ratios[1], -ratios[0].double(), dtype, "r flips with f's sign")
    assert abs(float(ratios[0])) > 1e-3
    for p, (u, v) in enumerate(zip(*updates)):
        assert_close(u, v.double(), dtype, f"same update for f and -f [{p}]")

