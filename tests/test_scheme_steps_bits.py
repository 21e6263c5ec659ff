"""The scheme wrappers over a few training steps, bit for bit against the same steps written out
with the public ops they are documented to run (``torch.autograd.grad`` twice, then
``multi_dot`` / ``aw_weights`` / ``aw_combine_`` for aw-loss, ``multi_dot`` and
``iga_correction_`` for BRC): gradients, weights, r and the parameters after each optimizer step
must be equal, not merely close (the wrappers' bookkeeping moves no value). Also the graph-sharing
test that decides whether the first backward keeps its graph, and parameters changed between
calls (frozen, unfrozen, added) being honoured at the next call.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as nnf
from helpers import cases, same_bits
from torch import nn

from nats_kernels import aw_combine_, aw_weights, iga_correction_, multi_dot
from nats_kernels.schemes import BRC, AWLoss, _grads

pytestmark = pytest.mark.single_thread

on_aw_backends = pytest.mark.parametrize("device,backend",
                                         cases("multi_dot", "aw_weights", "aw_combine_"))
on_brc_backends = pytest.mark.parametrize("device,backend",
                                          cases("multi_dot", "iga_correction_"))


def mlp(n_in, n_out, seed, width=7):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, width), nn.LeakyReLU(0.2), nn.Linear(width, 59),
                         nn.LeakyReLU(0.2), nn.Linear(59, n_out))


def pair(device):
    return mlp(2, 3, seed=1).to(device), mlp(3, 1, seed=2).to(device)


def batches(step, device):
    gen = torch.Generator().manual_seed(100 + step)
    return (torch.randn(33, 3, generator=gen).to(device),
            torch.randn(33, 2, generator=gen).to(device))


def trainable(m):
    return [p for p in m.parameters() if p.requires_grad]


def check_same(a_params, b_params):
    for a, b in zip(a_params, b_params, strict=True):
        assert same_bits(a.detach(), b.detach())
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert same_bits(a.grad, b.grad)


@on_aw_backends
@pytest.mark.parametrize("set_to_none", [True, False], ids=["grad_none", "grad_kept"])
def test_awloss_steps_bit_identical_to_the_ops_written_out(set_to_none, device, backend):
    G, D = pair(device)
    D2 = copy.deepcopy(D)
    aw = AWLoss(D)
    opt, opt2 = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (D, D2))
    for step in range(4):
        real, z = batches(step, device)
        with torch.no_grad():
            fake = G(z)
        opt.zero_grad(set_to_none=set_to_none)
        rl, fl = D(real), D(fake)
        loss = aw.backward(nnf.softplus(-rl).mean(), nnf.softplus(fl).mean(), rl, fl)

        opt2.zero_grad(set_to_none=True)
        rl2, fl2 = D2(real), D2(fake)
        p2 = trainable(D2)
        lr2, lf2 = nnf.softplus(-rl2).mean(), nnf.softplus(fl2).mean()
        g_r = torch.autograd.grad(lr2, p2)
        g_f = torch.autograd.grad(lf2, p2)
        w_r, w_f, case = aw_weights(multi_dot(g_r, g_f), rl2.detach(), fl2.detach())
        out = [g.clone() for g in g_r]
        aw_combine_(out, g_r, g_f, w_r, w_f)
        for p, g in zip(p2, out):
            p.grad = g

        assert same_bits(aw.last_weights[0], w_r) and same_bits(aw.last_weights[1], w_f)
        assert torch.equal(aw.last_case, case)
        assert same_bits(loss, w_r * lr2.detach() + w_f * lf2.detach())
        check_same(trainable(D), p2)
        opt.step()
        opt2.step()
        check_same(trainable(D), p2)


@on_brc_backends
@pytest.mark.parametrize("set_to_none", [True, False], ids=["grad_none", "grad_kept"])
def test_brc_steps_bit_identical_to_the_ops_written_out(set_to_none, device, backend):
    G, D = pair(device)
    G2, D2 = copy.deepcopy(G), copy.deepcopy(D)
    brc = BRC(G, D)
    opt, opt2 = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (G, G2))
    for step in range(4):
        real, z = batches(step, device)
        opt.zero_grad(set_to_none=set_to_none)
        fl = D(G(z))
        r = brc.backward(nnf.softplus(-fl).mean(),
                         nnf.softplus(-D(real)).mean() + nnf.softplus(fl).mean())

        opt2.zero_grad(set_to_none=set_to_none)
        fl2 = D2(G2(z))
        F2 = nnf.softplus(-fl2).mean()
        f2 = nnf.softplus(-D2(real)).mean() + nnf.softplus(fl2).mean()
        pd, pg = trainable(D2), trainable(G2)
        g_f = torch.autograd.grad(f2, pd + pg, retain_graph=True)
        g_F = torch.autograd.grad(F2, pd + pg)
        n = len(pd)
        dots = multi_dot(g_f[:n], g_F[:n])
        r2 = dots[2] / (dots[0] + 1e-12)
        corrected = [g.clone() for g in g_F[n:]]
        iga_correction_(corrected, g_f[n:], r2)
        for p, g in zip(pg, corrected):
            if p.grad is None:
                p.grad = g
            else:
                p.grad += g

        assert same_bits(r, r2) and same_bits(brc.last_ratio, r2)
        assert same_bits(brc.last_norms, dots[:2].sqrt())
        check_same(trainable(G), pg)
        for p in D.parameters():  # D's .grad is neither read nor written
            assert p.grad is None
        opt.step()
        opt2.step()
        check_same(trainable(G), pg)


# ------------------------------------------------------------------------------ shares_graph


def test_shares_graph():
    w = nn.Parameter(torch.randn(4, 4))
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    h = torch.tanh(x @ w)
    deep = h
    for _ in range(20):
        deep = deep * 1.5 + 1  # a long chain: the shared node lies far from one root
    assert _grads.shares_graph(deep.sum(), (h ** 2).sum())  # shared non-leaf node
    assert _grads.shares_graph((h ** 2).sum(), deep.sum())
    assert _grads.shares_graph(h.sum(), h.sum())
    loss = h.sum()
    assert _grads.shares_graph(loss, loss)  # one tensor: one root
    # two forwards that meet only at the parameter leaves (AccumulateGrad) are disjoint
    assert not _grads.shares_graph((x @ w).sum(), (y @ w).relu().mean())
    assert not _grads.shares_graph(deep.sum(), torch.tanh(y @ w).sum())
    # a leaf loss has no graph
    assert not _grads.shares_graph(w.sum(), w)
    # one forward on cat(real, fake), split afterwards: the cat node is shared
    out = torch.cat((x, y)) @ w
    assert _grads.shares_graph(out[:3].mean(), out[3:].mean())


def test_shares_graph_decides_retain_graph():
    """The answer is the one autograd needs: the second pass over a shared graph fails when the
    first pass freed it, and AWLoss keeps it exactly then."""
    w = nn.Parameter(torch.randn(4, 4))
    x = torch.randn(3, 4)
    h = torch.tanh(x @ w)
    a, b = (h * 2).sum(), (h * 3).sum()
    assert _grads.shares_graph(a, b)
    torch.autograd.grad(a, [w])
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(b, [w])


# ------------------------------------------------------------------- parameters between calls


def d_losses(D, G, device, step=0):
    real, z = batches(step, device)
    with torch.no_grad():
        fake = G(z)
    rl, fl = D(real), D(fake)
    return nnf.softplus(-rl).mean(), nnf.softplus(fl).mean(), rl, fl


def test_awloss_honours_parameters_changed_between_calls():
    G, D = pair("cpu")
    aw = AWLoss(D)
    aw.backward(*d_losses(D, G, "cpu"))
    first = D[0].weight
    assert first.grad is not None
    # frozen after a call: not touched by the next one
    first.requires_grad_(False)
    kept = first.grad
    D.zero_grad(set_to_none=True)
    first.grad = kept
    before = kept.clone()
    aw.backward(*d_losses(D, G, "cpu", 1))
    assert torch.equal(kept, before)
    assert first.grad is kept and D[2].weight.grad is not None
    # unfrozen again: written again (in place: it is a dense tensor outside any graph)
    before = kept.clone()
    first.requires_grad_(True)
    aw.backward(*d_losses(D, G, "cpu", 2))
    assert not torch.equal(first.grad, before)
    # a parameter added to the module after construction takes part
    D[4].extra = nn.Parameter(torch.ones(()))
    hook = D[4].register_forward_hook(lambda m, i, o: o * m.extra)
    aw.backward(*d_losses(D, G, "cpu", 3))
    assert D[4].extra.grad is not None
    hook.remove()
    del D[4].extra
    aw.backward(*d_losses(D, G, "cpu", 4))
    # every trainable parameter frozen: refused, as at construction
    D.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        aw.backward(*d_losses(D, G, "cpu", 5))


def test_brc_honours_parameters_changed_between_calls():
    G, D = pair("cpu")
    brc = BRC(G, D)

    def losses(step):
        real, z = batches(step, "cpu")
        fl = D(G(z))
        return nnf.softplus(-fl).mean(), nnf.softplus(-D(real)).mean() + nnf.softplus(fl).mean()

    brc.backward(*losses(0))
    G.zero_grad(set_to_none=True)
    G[0].weight.requires_grad_(False)
    brc.backward(*losses(1))
    assert G[0].weight.grad is None and G[2].weight.grad is not None
    G[0].weight.requires_grad_(True)
    G.zero_grad(set_to_none=True)
    G[4].extra = nn.Parameter(torch.ones(()))
    G[4].register_forward_hook(lambda m, i, o: o * m.extra)
    brc.backward(*losses(2))
    assert G[0].weight.grad is not None and G[4].extra.grad is not None
    G.requires_grad_(False)
    with pytest.raises(ValueError, match="generator has no parameter"):
        brc.backward(*losses(3))
