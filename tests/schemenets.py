"""Networks, losses and checks shared by the scheme tests (test_scheme_aw.py, test_scheme_brc.py):
float64 networks whose parameters take every role a scheme must handle (frozen, one-sided,
unused, handed one gradient tensor together or a gradient tensor the module keeps, mixed dtypes)
or whose logits a test chooses, the discriminator losses, and the check that every ``.grad`` is
its own memory."""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from helpers import assert_close
from torch import nn

F64 = torch.float64


def rand(*shape, seed=0, scale=1.0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=F64) * scale).to(device)


def close(actual, expected, what):
    assert_close(actual, expected.to(actual.device), F64, what)


def assert_own_grads(module):
    """Every .grad of the module is its own memory with its parameter's strides (the layout
    AccumulateGrad keeps): a gradient handed to two parameters at once must not become two
    parameters' .grad, nor an expanded or transposed gradient a .grad."""
    grads = [(n, p) for n, p in module.named_parameters() if p.grad is not None]
    for name, p in grads:
        assert p.grad.stride() == p.stride(), f"{name}.grad strides {p.grad.stride()}"
    ptrs = [p.grad.untyped_storage().data_ptr() for _, p in grads]
    assert len(ptrs) == len(set(ptrs)), "two parameters share one .grad storage"


# ------------------------------------------------------------------------------ networks


def mlp(i, o, width=16, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(i, width), nn.LeakyReLU(0.2), nn.Linear(width, width), nn.LeakyReLU(0.2),
        nn.Linear(width, o),
    ).double()


def conv_d(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(0.2),
        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 1),
    ).double()


class OffsetD(nn.Module):
    """A small MLP whose output is shifted by the last input column, so that a test chooses the
    logits (hence the scores s_r, s_f) while the gradients stay real network gradients."""

    def __init__(self, seed=0):
        super().__init__()
        self.body = mlp(2, 1, seed=seed)

    def forward(self, x):
        return 0.1 * self.body(x[:, :-1]) + x[:, -1:]


class AliasD(nn.Module):
    """Autograd hands the same gradient tensor to ``a`` and ``b`` (both operands of one add), an
    expanded (stride-0) gradient to ``c`` and a transposed one to ``t``: gradients that must not
    be written in place or must not become ``.grad`` as they are."""

    def __init__(self, seed=0):
        super().__init__()
        self.lin = nn.Linear(4, 1).double()
        self.a = nn.Parameter(rand(4, seed=seed + 1))
        self.b = nn.Parameter(rand(4, seed=seed + 2))
        self.c = nn.Parameter(rand(3, seed=seed + 3))
        self.t = nn.Parameter(rand(4, 2, seed=seed + 4))

    def forward(self, x):
        return (self.lin(x) + ((self.a + self.b) * x).sum(-1, keepdim=True) + self.c.sum()
                + nnf.linear(x, self.t.t().contiguous()).sum(-1, keepdim=True))


class PartialD(nn.Module):
    """Parameters in every role: a frozen layer, one used only on real data, one used only on fake
    data, one never used."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.frozen = nn.Linear(2, 8).double().requires_grad_(False)
        self.body = mlp(8, 1, width=8, seed=seed + 1)
        self.real_only = nn.Parameter(rand(1, seed=seed + 2))
        self.fake_only = nn.Parameter(rand(8, seed=seed + 3))
        self.unused = nn.Parameter(rand(3, seed=seed + 4))

    def forward(self, x, real):
        h = self.frozen(x)
        if real:
            return self.body(h) + self.real_only
        return self.body(h * self.fake_only)


class Hands(torch.autograd.Function):
    """Identity on ``x`` whose backward hands ``given`` (a tensor the caller keeps) to ``p`` as
    its gradient."""

    @staticmethod
    def forward(ctx, x, p, given):
        ctx.given = given
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g, ctx.given, None


class HandsD(nn.Module):
    """``p2``'s gradient, in every pass, is the tensor ``given`` the module keeps."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1).double()
        self.p1 = nn.Parameter(rand(2, seed=1))
        self.p2 = nn.Parameter(torch.zeros(2, dtype=F64))
        self.register_buffer("given", rand(2, seed=2), persistent=False)

    def forward(self, x):
        x = Hands.apply(x, self.p2, self.given)
        return self.lin(x) + (self.p1 * x).sum(-1, keepdim=True)


class MixedD(nn.Module):
    """A discriminator with a float32 and a float64 layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(2, 8)  # float32
        self.b = nn.Linear(8, 1).double()

    def forward(self, x):
        return self.b(nnf.leaky_relu(self.a(x.float()), 0.2).double())


# --------------------------------------------------------------------------------- losses


def hinge(real_logits, fake_logits):
    return torch.relu(1 - real_logits).mean(), torch.relu(1 + fake_logits).mean()


def bce(real_logits, fake_logits):
    return (
        nnf.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits)),
        nnf.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)),
    )

