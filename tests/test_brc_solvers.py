"""BRC's "cg" and "neumann" solvers (design §5.4) against dense linear algebra in float64: the
full Hessian of f over (D, G) of a tiny nonlinear model taken with torch.autograd.functional,
then the exact implicit term ``dF/dG - H_GD (H_DD + damping I)^-1 dF/dD``, CG's iterates and the
truncated Neumann series written densely here. Also ``ratio_clamp`` and ``last_norms`` of
"iga", and every argument error.

The tests that reach an op run once per backend implementing the ops the solvers use
(multi_dot, aw_combine_, iga_correction_).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as nnf
from helpers import cases
from torch import nn
from torch.func import functional_call

from nats_kernels.schemes import BRC

pytestmark = pytest.mark.single_thread

on_backends = pytest.mark.parametrize(
    "device,backend", cases("multi_dot", "aw_combine_", "iga_correction_", "iga_ratio"))


def tiny(seed=0):
    """A 2 -> 2 generator and a 2 -> 4 -> 1 tanh discriminator in float64: 12 + 17 parameters,
    nonlinear in D (so H_DD and H_GD are full) and G."""
    torch.manual_seed(seed)
    G = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2)).double()
    D = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    real = torch.randn(9, 2, dtype=torch.float64) + 1.0
    z = torch.randn(9, 2, dtype=torch.float64)
    return G, D, real, z


def losses(G, D, real, z, params=None):
    """F (non-saturating) and f (BCE) on the same fake batch; with ``params`` = (g, d) dicts,
    evaluated at those parameter values (functional form for the dense Hessian)."""
    fake = G(z) if params is None else functional_call(G, params[0], (z,))
    d = (lambda x: D(x)) if params is None else (lambda x: functional_call(D, params[1], (x,)))
    lf = d(fake)
    F = nnf.binary_cross_entropy_with_logits(lf, torch.ones_like(lf))
    lr = d(real)
    f = (nnf.binary_cross_entropy_with_logits(lr, torch.ones_like(lr))
         + nnf.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf)))
    return F, f


def dense(G, D, real, z):
    """(H_DD, H_GD, dF/dD, dF/dG) as float64 matrices/vectors over the flat parameters."""
    g_names = [n for n, _ in G.named_parameters()]
    d_names = [n for n, _ in D.named_parameters()]
    g_shapes = [p.shape for p in G.parameters()]
    d_shapes = [p.shape for p in D.parameters()]
    n_g = sum(p.numel() for p in G.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in G.parameters()]
                     + [p.detach().reshape(-1) for p in D.parameters()])

    def unflat(x):
        out, i = [], 0
        for shapes, names in ((g_shapes, g_names), (d_shapes, d_names)):
            dct = {}
            for n, s in zip(names, shapes):
                k = s.numel()
                dct[n] = x[i:i + k].view(s)
                i += k
            out.append(dct)
        return out

    H = torch.autograd.functional.hessian(lambda x: losses(G, D, real, z, unflat(x))[1], flat)
    gF = torch.autograd.functional.jacobian(lambda x: losses(G, D, real, z, unflat(x))[0], flat)
    return H[n_g:, n_g:], H[:n_g, n_g:], gF[n_g:], gF[:n_g]


def generator_grad(G) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in G.parameters()])


def run_brc(G, D, real, z, **kw) -> BRC:
    brc = BRC(G, D, **kw)
    F, f = losses(G, D, real, z)
    brc.backward(F, f)
    return brc


def damping_for(H_dd) -> float:
    """A damping that makes H_DD + damping I positive definite with margin."""
    return max(0.05, 0.1 - torch.linalg.eigvalsh(H_dd).min().item())


@on_backends
def test_cg_converges_to_the_dense_implicit_term(device, backend):
    G, D, real, z = tiny()
    H_dd, H_gd, gF_d, gF_g = dense(G, D, real, z)
    lam = damping_for(H_dd)
    A = H_dd + lam * torch.eye(H_dd.shape[0], dtype=torch.float64)
    exact = gF_g - H_gd @ torch.linalg.solve(A, gF_d)
    # CG on an n x n positive definite system is exact after n steps (17 here); 40 leave
    # rounding only.
    brc = run_brc(G, D, real, z, solver="cg", iters=40, damping=lam)
    torch.testing.assert_close(generator_grad(G), exact, rtol=1e-9, atol=1e-11)
    assert brc.last_residual.item() < 1e-9
    assert brc.last_ratio is None and brc.last_norms is None
    # Not the plain gradient, nor eq. 9: the term is really there.
    assert (exact - gF_g).norm() > 1e-3 * exact.norm()


@pytest.mark.parametrize("iters", [1, 2, 5])
@on_backends
def test_cg_iterates_match_dense_cg(device, backend, iters):
    G, D, real, z = tiny(1)
    H_dd, H_gd, gF_d, gF_g = dense(G, D, real, z)
    lam = damping_for(H_dd)
    A = H_dd + lam * torch.eye(H_dd.shape[0], dtype=torch.float64)
    x = torch.zeros_like(gF_d)
    r = gF_d.clone()
    p = r.clone()
    for _ in range(iters):
        alpha = (r @ r) / (p @ A @ p)
        x = x + alpha * p
        r_new = r - alpha * (A @ p)
        p = r_new + ((r_new @ r_new) / (r @ r)) * p
        r = r_new
    brc = run_brc(G, D, real, z, solver="cg", iters=iters, damping=lam)
    torch.testing.assert_close(generator_grad(G), gF_g - H_gd @ x, rtol=1e-9, atol=1e-12)
    expected_residual = (r.norm() / gF_d.norm()).item()
    assert brc.last_residual.item() == pytest.approx(expected_residual, rel=1e-6)


@pytest.mark.parametrize("iters,step", [(1, 0.3), (3, 0.2), (12, 0.1)])
@on_backends
def test_neumann_is_the_truncated_series(device, backend, iters, step):
    G, D, real, z = tiny(2)
    H_dd, H_gd, gF_d, gF_g = dense(G, D, real, z)
    lam = 0.5
    A = H_dd + lam * torch.eye(H_dd.shape[0], dtype=torch.float64)
    term, total = gF_d.clone(), gF_d.clone()
    for _ in range(iters):
        term = term - step * (A @ term)
        total = total + term
    v = step * total
    brc = run_brc(G, D, real, z, solver="neumann", iters=iters, damping=lam, neumann_step=step)
    torch.testing.assert_close(generator_grad(G), gF_g - H_gd @ v, rtol=1e-9, atol=1e-12)
    assert brc.last_residual.item() == pytest.approx((step * term.norm() / v.norm()).item(),
                                                     rel=1e-6)


def test_neumann_approaches_the_solve_when_it_converges():
    G, D, real, z = tiny(3)
    H_dd, H_gd, gF_d, gF_g = dense(G, D, real, z)
    lam = damping_for(H_dd)
    A = H_dd + lam * torch.eye(H_dd.shape[0], dtype=torch.float64)
    eig = torch.linalg.eigvalsh(A)
    step = 1.0 / eig.max().item()  # every eigenvalue of I - step A in [0, 1)
    exact = gF_g - H_gd @ torch.linalg.solve(A, gF_d)
    errors = []
    for iters in (5, 50, 2000):
        G2, D2, *_ = tiny(3)
        run_brc(G2, D2, real, z, solver="neumann", iters=iters, damping=lam, neumann_step=step)
        errors.append((generator_grad(G2) - exact).norm().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-6 * exact.norm().item()


@on_backends
def test_solver_accumulates_into_existing_grad(device, backend):
    G, D, real, z = tiny(4)
    fresh = run_brc(G, D, real, z, solver="cg", iters=3)
    once = generator_grad(G).clone()
    assert fresh.last_residual is not None
    G2, D2, *_ = tiny(4)
    for p in G2.parameters():
        p.grad = torch.full_like(p, 0.25)
    d_before = [p.grad for p in D2.parameters()]
    run_brc(G2, D2, real, z, solver="cg", iters=3)
    torch.testing.assert_close(generator_grad(G2), once + 0.25, rtol=1e-12, atol=1e-12)
    assert all(g is None for g in d_before) and all(p.grad is None for p in D2.parameters())


def test_solver_refuses_a_detached_fake_batch():
    G, D, real, z = tiny()
    brc = BRC(G, D, solver="cg")
    fake = G(z)
    lf = D(fake)
    F = nnf.binary_cross_entropy_with_logits(lf, torch.ones_like(lf))
    ld = D(fake.detach())
    f = nnf.binary_cross_entropy_with_logits(ld, torch.zeros_like(ld)) + D(real).mean()
    with pytest.raises(ValueError, match="does not depend on the generator"):
        brc.backward(F, f)


@on_backends
def test_ratio_clamp_and_norms(device, backend):
    G, D, real, z = tiny(5)
    F, f = losses(G, D, real, z)
    p_d = list(D.parameters())
    gf = torch.cat([g.reshape(-1) for g in torch.autograd.grad(f, p_d, retain_graph=True)])
    gF = torch.cat([g.reshape(-1) for g in torch.autograd.grad(F, p_d, retain_graph=True)])
    r = (gf @ gF) / (gf @ gf + 1e-12)
    plain = run_brc(G, D, real, z)
    torch.testing.assert_close(plain.last_ratio, r, rtol=1e-12, atol=0)
    torch.testing.assert_close(plain.last_norms, torch.stack([gf.norm(), gF.norm()]),
                               rtol=1e-12, atol=0)
    assert plain.last_residual is None
    lo, hi = r.item() + 0.125, r.item() + 0.5  # r lies below the interval: clamped to lo
    G2, D2, *_ = tiny(5)
    clamped = run_brc(G2, D2, real, z, ratio_clamp=(lo, hi))
    assert clamped.last_ratio.item() == lo
    # The update used the clamped r: dF/dG - lo * df/dG.
    F2, f2 = losses(G2, D2, real, z)
    p_g = list(G2.parameters())
    gF_g = torch.cat([g.reshape(-1) for g in torch.autograd.grad(F2, p_g, retain_graph=True)])
    gf_g = torch.cat([g.reshape(-1) for g in torch.autograd.grad(f2, p_g)])
    torch.testing.assert_close(generator_grad(G2), gF_g - lo * gf_g, rtol=1e-12, atol=1e-14)
    assert "ratio_clamp" in repr(clamped)


@pytest.mark.parametrize("kw,err,match", [
    ({"solver": "newton"}, ValueError, "solver must be one of"),
    ({"solver": 1}, TypeError, "solver must be a str"),
    ({"solver": "cg", "iters": 0}, ValueError, "iters"),
    ({"solver": "cg", "iters": 2.0}, TypeError, "iters"),
    ({"solver": "cg", "damping": -1.0}, ValueError, "damping"),
    ({"solver": "cg", "damping": float("nan")}, ValueError, "damping"),
    ({"solver": "neumann", "neumann_step": 0.0}, ValueError, "neumann_step"),
    ({"solver": "neumann", "neumann_step": "0.1"}, TypeError, "neumann_step"),
    ({"solver": "cg", "ratio_clamp": (-1, 1)}, ValueError, "solver='iga' only"),
    ({"ratio_clamp": (1, -1)}, ValueError, "lo <= hi"),
    ({"ratio_clamp": (float("-inf"), 1)}, ValueError, "finite"),
    ({"ratio_clamp": (0,)}, ValueError, "pair"),
    ({"ratio_clamp": 1.0}, ValueError, "pair"),
])
def test_bad_solver_arguments(kw, err, match):
    G, D, *_ = tiny()
    with pytest.raises(err, match=match):
        BRC(G, D, **kw)


def test_solver_needs_one_discriminator_dtype():
    G, D, *_ = tiny()
    D[2].float()
    BRC(G, D)  # eq. 9 handles mixed dtypes
    with pytest.raises(ValueError, match="one dtype"):
        BRC(G, D, solver="neumann")


def test_solver_repr():
    G, D, *_ = tiny()
    assert repr(BRC(G, D, solver="cg", iters=4, damping=0.5)) == \
        "BRC(solver='cg', iters=4, damping=0.5)"
    assert "neumann_step=0.2" in repr(BRC(G, D, solver="neumann", neumann_step=0.2))
