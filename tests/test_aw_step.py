"""The aw step of design §4 end to end -- multi_dot, aw_weights, aw_combine_ on the gradients of
a small discriminator -- against the official aw_loss.py procedure, on every backend that
implements the three ops; and the three ops traced by torch.compile into one graph (no value
read on the host).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from awrule import logits_for
from helpers import assert_close, cases
from listops import assert_unchanged, snapshot, tensor_list

import nats_kernels as nk

pytestmark = pytest.mark.single_thread


class Disc(torch.nn.Module):
    """A small MLP discriminator plus a linear skip on the first input coordinate (so that
    shifting real and fake data along it moves their scores), and one parameter the loss never
    uses (gradient None: skipped by the official code and by the fused path alike)."""

    def __init__(self, dtype, seed, bias, gain):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.body = torch.nn.Sequential(
                torch.nn.Linear(5, 16), torch.nn.LeakyReLU(0.2), torch.nn.Linear(16, 7),
                torch.nn.LeakyReLU(0.2), torch.nn.Linear(7, 1),
            ).to(dtype)
            self.skip = torch.nn.Linear(5, 1, bias=False).to(dtype)
            self.unused = torch.nn.Linear(3, 3).to(dtype)
        with torch.no_grad():
            self.body[-1].bias.fill_(bias)
            self.skip.weight.zero_()
            self.skip.weight[0, 0] = gain

    def forward(self, x):
        return self.body(x) + self.skip(x)


def official_aw_step(D, loss_r, loss_f, real_logits, fake_logits, normalized):
    """The official aw_loss.py procedure: gradient clones, concatenations, three dots read on
    the host, the rule in Python, a per-parameter write-back into ``.grad``."""
    D.zero_grad(set_to_none=True)
    loss_r.backward(retain_graph=True)
    grad_real = [p.grad.clone() for p in D.parameters() if p.grad is not None]
    real_list = torch.cat([g.reshape(-1) for g in grad_real])
    D.zero_grad(set_to_none=True)
    loss_f.backward(retain_graph=True)
    grad_fake = [p.grad.clone() for p in D.parameters() if p.grad is not None]
    fake_list = torch.cat([g.reshape(-1) for g in grad_fake])
    rdotr = torch.dot(real_list, real_list).item() + 1e-4
    fdotf = torch.dot(fake_list, fake_list).item() + 1e-4
    rdotf = torch.dot(real_list, fake_list).item()
    r_norm, f_norm = math.sqrt(rdotr), math.sqrt(fdotf)
    rs = torch.mean(torch.sigmoid(real_logits))
    fs = torch.mean(torch.sigmoid(fake_logits))
    alpha1, alpha2, delta, eps = 0.5, 0.75, 0.05, 0.05
    if normalized:
        inv_r, inv_f = 1 / r_norm, 1 / f_norm
        scale_r, scale_f = rdotr * f_norm, fdotf * r_norm
    else:
        inv_r = inv_f = 1.0
        scale_r, scale_f = rdotr, fdotf
    if rs < alpha1 or rs < (fs - delta):
        case = 1 if rdotf <= 0 else 2
        w_r = inv_r + eps
        w_f = (-rdotf / scale_f + eps) if rdotf <= 0 else eps
    elif rs > alpha2 and rs > (fs - delta):
        case = 3 if rdotf <= 0 else 4
        w_r = (-rdotf / scale_r + eps) if rdotf <= 0 else eps
        w_f = inv_f + eps
    else:
        case, w_r, w_f = 5, inv_r + eps, inv_f + eps
    index = 0
    for p in D.parameters():
        if p.grad is not None:
            p.grad = w_r * grad_real[index] + w_f * grad_fake[index]
            index += 1
    return w_r, w_f, case, [p.grad for p in D.parameters() if p.grad is not None]


@pytest.mark.parametrize("device,backend",
                         cases("multi_dot", "aw_weights", "aw_combine_"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "gain,bias,mean_real,mean_fake,expected_case",
    [
        (1.0, 0.0, -1.0, -1.0, 1),
        (1.0, -1.0, -3.0, 0.0, 2),
        (1.0, 1.0, 1.0, -1.0, 3),
        (1.0, 0.0, 3.0, 0.0, 3),  # every real above the hinge: g_r = 0, rf = 0 exactly
        (0.5, 0.0, 3.0, -1.0, 4),
        (1.0, 0.0, 1.0, -1.0, 5),
    ],
)
def test_aw_step_end_to_end(device, backend, dtype, gain, bias, mean_real, mean_fake,
                            expected_case):
    for normalized in (True, False):
        check_aw_step(device, dtype, normalized, gain, bias, mean_real, mean_fake, expected_case)


def check_aw_step(device, dtype, normalized, gain, bias, mean_real, mean_fake, expected_case):
    D = Disc(dtype, seed=7, bias=bias, gain=gain).to(device)
    gen = torch.Generator().manual_seed(8)
    e0 = torch.tensor([1.0, 0, 0, 0, 0], dtype=dtype)
    real = (torch.randn(24, 5, generator=gen, dtype=dtype) + mean_real * e0).to(device)
    fake = (torch.randn(24, 5, generator=gen, dtype=dtype) + mean_fake * e0).to(device)
    real_logits, fake_logits = D(real), D(fake)
    loss_r = F.relu(1 - real_logits).mean()
    loss_f = F.relu(1 + fake_logits).mean()

    params = list(D.parameters())
    g_r = torch.autograd.grad(loss_r, params, retain_graph=True, allow_unused=True)
    g_f = torch.autograd.grad(loss_f, params, retain_graph=True, allow_unused=True)
    keep = [i for i, g in enumerate(g_r) if g is not None]
    assert len(keep) == len(params) - 2  # the unused Linear's weight and bias
    g_r = [g_r[i] for i in keep]
    g_f = [g_f[i] for i in keep]
    before_r, before_f = snapshot(g_r), snapshot(g_f)
    dots = nk.multi_dot(g_r, g_f)
    if loss_r.item() == 0:
        assert dots[0] == 0 and dots[2] == 0  # rf exactly 0 takes the rf <= 0 column
    w_r, w_f, case = nk.aw_weights(dots, real_logits.detach(), fake_logits.detach(),
                                   normalized=normalized)
    out = [torch.empty_like(g) for g in g_r]
    nk.aw_combine_(out, g_r, g_f, w_r, w_f)
    assert_unchanged(g_r, before_r, "g_r")
    assert_unchanged(g_f, before_f, "g_f")

    o_r, o_f, o_case, o_grads = official_aw_step(D, loss_r, loss_f, real_logits.detach(),
                                                 fake_logits.detach(), normalized)
    assert int(case) == o_case == expected_case
    assert_close(w_r, torch.tensor(o_r, dtype=torch.float64), dtype, "w_r vs official")
    assert_close(w_f, torch.tensor(o_f, dtype=torch.float64), dtype, "w_f vs official")
    assert len(o_grads) == len(out)
    for p, (o, e) in enumerate(zip(out, o_grads)):
        assert_close(o, e, dtype, f"combined gradient [{p}] vs official")
    # The reported loss, w_r L_r + w_f L_f, from the device weights.
    loss = w_r * loss_r.detach() + w_f * loss_f.detach()
    assert_close(loss, torch.tensor(o_r * loss_r.item() + o_f * loss_f.item(),
                                    dtype=torch.float64), dtype, "aw loss")


# ----------------------------------------------------------------------- torch.compile, no sync


# torch.compile itself warns that torch.jit.script_method is deprecated (torch internals).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("device,backend",
                         cases("multi_dot", "aw_weights", "aw_combine_"))
def test_aw_step_compiles_fullgraph(device, backend):
    """multi_dot + aw_weights + aw_combine_ trace into one graph: no value read on the host."""

    def step(g_r, g_f, out, real_logits, fake_logits):
        dots = nk.multi_dot(g_r, g_f)
        w_r, w_f, case = nk.aw_weights(dots, real_logits, fake_logits, normalized=True)
        nk.aw_combine_(out, g_r, g_f, w_r, w_f)
        return dots, w_r, w_f, case

    shapes = [(7, 5), (), (59,), (0,)]
    g_r = tensor_list(shapes, torch.float32, device, seed=41, layout="mixed")
    g_f = tensor_list(shapes, torch.float32, device, seed=42, layout="mixed", which=1)
    real = logits_for(0.3, (16,), device=device, seed=43)
    fake = logits_for(0.6, (16,), device=device, seed=44)
    eager_out = [torch.zeros_like(t) for t in g_r]
    compiled_out = [torch.zeros_like(t) for t in g_r]
    eager = step(g_r, g_f, eager_out, real, fake)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(g_r, g_f, compiled_out, real, fake)
    for name, e, c in zip(("dots", "w_r", "w_f", "case"), eager, compiled):
        assert c.dtype == e.dtype and c.shape == e.shape, name
        torch.testing.assert_close(c, e, msg=lambda m, name=name: f"{name}: {m}")
    assert int(compiled[3]) == 1
    for p, (c, e) in enumerate(zip(compiled_out, eager_out)):
        torch.testing.assert_close(c, e, msg=lambda m, p=p: f"out[{p}]: {m}")

