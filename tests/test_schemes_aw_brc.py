"""AWLoss and BRC (design §4, §5, §7) against independent oracles written here.

AWLoss's oracle is the official aw-loss procedure: ``backward()`` per term, clone the gradients,
``torch.cat`` them, three ``torch.dot(...).item()``, the rule in plain Python, a per-parameter
write-back. BRC's oracle takes each gradient with its own ``torch.autograd.grad`` call and applies
eq. 9 in float64 on the host. Everything runs in float64 so the comparison is tight.

Every test that reaches an op runs once per backend that implements the scheme's ops
(``helpers.cases``: reference and cpu on CPU tensors, triton and cuda on CUDA tensors, triton on
CPU tensors under TRITON_INTERPRET=1), so the reference kernels are checked here too and not only
the one ``auto`` picks. Tests of pure argument checking, of the test networks themselves and of
the meta device run once.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as nnf
from helpers import assert_close, cases
from torch import nn

from nats_kernels.schemes import BRC, AWLoss

pytestmark = pytest.mark.single_thread

F64 = torch.float64
NORM_EPS = 1e-4  # design §4: added to both squared norms

# (device, backend) pairs of the ops each scheme calls.
AW_CASES = cases("multi_dot", "aw_weights", "aw_combine_")
BRC_CASES = cases("multi_dot", "iga_ratio", "iga_correction_")
on_aw_backends = pytest.mark.parametrize("device,backend", AW_CASES)
on_brc_backends = pytest.mark.parametrize("device,backend", BRC_CASES)


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


# --------------------------------------------------------------------------------- losses


def hinge(real_logits, fake_logits):
    return torch.relu(1 - real_logits).mean(), torch.relu(1 + fake_logits).mean()


def bce(real_logits, fake_logits):
    return (
        nnf.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits)),
        nnf.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)),
    )


def lsgan(real_logits, fake_logits):
    return 0.5 * ((real_logits - 1) ** 2).mean(), 0.5 * (fake_logits**2).mean()


LOSSES = {"hinge": hinge, "bce": bce, "lsgan": lsgan}


# ------------------------------------------------------------------------- aw-loss oracle


def oracle_rule(rr, ff, rf, s_r, s_f, normalized, alpha1=0.5, alpha2=0.75, delta=0.05, eps=0.05):
    """design §4's table in plain Python. rr and ff already include the 1e-4."""
    r_norm, f_norm = math.sqrt(rr), math.sqrt(ff)
    inv_r, inv_f = (1 / r_norm, 1 / f_norm) if normalized else (1.0, 1.0)
    if s_r < alpha1 or s_r < s_f - delta:
        if rf <= 0:
            return inv_r + eps, -rf / ff * inv_r + eps, 1
        return inv_r + eps, eps, 2
    if s_r > alpha2 and s_r > s_f - delta:
        if rf <= 0:
            return -rf / rr * inv_f + eps, inv_f + eps, 3
        return eps, inv_f + eps, 4
    return inv_r + eps, inv_f + eps, 5


def official_aw(D, loss_real, loss_fake, real_logits, fake_logits, normalized=True, **hyper):
    """The official aw_loss.py procedure. Its one change: a parameter with a gradient in only one
    pass gets zeros for the other (the official lists would silently misalign), and one with no
    gradient at all keeps ``.grad`` None, as design §7 asks."""
    params = [p for p in D.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss_real.backward(retain_graph=True)
    grad_real = [None if p.grad is None else p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    loss_fake.backward()
    grad_fake = [None if p.grad is None else p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    used = [i for i, p in enumerate(params) if grad_real[i] is not None or grad_fake[i] is not None]
    zr = {i: torch.zeros_like(params[i]) if grad_real[i] is None else grad_real[i] for i in used}
    zf = {i: torch.zeros_like(params[i]) if grad_fake[i] is None else grad_fake[i] for i in used}
    real_list = torch.cat([zr[i].double().reshape(-1) for i in used])
    fake_list = torch.cat([zf[i].double().reshape(-1) for i in used])
    rr = torch.dot(real_list, real_list).item() + NORM_EPS
    ff = torch.dot(fake_list, fake_list).item() + NORM_EPS
    rf = torch.dot(real_list, fake_list).item()
    s_r = torch.mean(torch.sigmoid(real_logits.double())).item()
    s_f = torch.mean(torch.sigmoid(fake_logits.double())).item()
    w_r, w_f, case = oracle_rule(rr, ff, rf, s_r, s_f, normalized, **hyper)
    for i in used:
        params[i].grad = (w_r * zr[i].double() + w_f * zf[i].double()).to(params[i].dtype)
    return w_r * loss_real.item() + w_f * loss_fake.item(), w_r, w_f, case


def run_both(D, forward, normalized=True, preset=None, **hyper):
    """Run AWLoss on ``D`` and the official procedure on a deep copy, from the same inputs.
    ``forward(D) -> (loss_real, loss_fake, real_logits, fake_logits)``. ``preset(D)`` runs
    before AWLoss only (stale gradients it must overwrite). Returns (D, D_oracle, aw, loss,
    oracle tuple)."""
    D_oracle = copy.deepcopy(D)
    expected = official_aw(D_oracle, *forward(D_oracle), normalized=normalized, **hyper)
    if preset is not None:
        preset(D)
    aw = AWLoss(D, normalized=normalized, **hyper)
    loss = aw.backward(*forward(D))
    return D, D_oracle, aw, loss, expected


def check_against_oracle(D, D_oracle, aw, loss, expected):
    e_loss, e_r, e_f, e_case = expected
    w_r, w_f = aw.last_weights
    assert int(aw.last_case) == e_case, f"case {int(aw.last_case)}, oracle {e_case}"
    close(w_r, torch.tensor(e_r, dtype=F64), "w_r")
    close(w_f, torch.tensor(e_f, dtype=F64), "w_f")
    assert loss.shape == () and not loss.requires_grad and loss.grad_fn is None
    close(loss, torch.tensor(e_loss, dtype=F64), "aw loss")
    for (name, p), q in zip(D.named_parameters(), D_oracle.parameters()):
        if not p.requires_grad:
            continue  # frozen: the test checks what it preset
        assert (p.grad is None) == (q.grad is None), f"{name}: .grad None-ness differs"
        if p.grad is not None:
            close(p.grad, q.grad, f"{name}.grad")
    assert_own_grads(D)
    return e_case


def sample_forward(loss_fn, shape, seed=0, fake_shift=0.5, dtype=F64, device="cpu"):
    real = rand(*shape, seed=seed).to(dtype).to(device)
    fake = (rand(*shape, seed=seed + 1) + fake_shift).to(dtype).to(device)

    def forward(net):
        real_logits, fake_logits = net(real), net(fake)
        return (*loss_fn(real_logits, fake_logits), real_logits, fake_logits)

    return forward


# --------------------------------------------------------------------------------- AWLoss


def test_offset_d_makes_rf_sign_follow_the_loss_coefficients():
    # The case tests below rely on this: with the same base rows for real and fake, the LSGAN
    # coefficients (D_r - 1) and D_f decide the sign of <g_r, g_f>.
    base = rand(8, 2, seed=3, scale=0.1) + 1.0
    D = OffsetD()
    params = list(D.parameters())
    for t_r, t_f, sign in ((-1.0, 1.0, -1), (-1.0, -2.0, 1), (2.0, -1.0, -1), (2.0, 1.0, 1)):
        real = torch.cat((base, torch.full((8, 1), t_r, dtype=F64)), 1)
        fake = torch.cat((base, torch.full((8, 1), t_f, dtype=F64)), 1)
        g_r = torch.autograd.grad(lsgan(D(real), D(fake))[0], params)
        g_f = torch.autograd.grad(lsgan(D(real), D(fake))[1], params)
        rf = sum((a * b).sum() for a, b in zip(g_r, g_f))
        assert torch.sign(rf) == sign, (t_r, t_f, float(rf))


# (t_r, t_f): logit offsets of the real and fake batch, chosen for each case of the table.
CASES = {
    "1-weak-real": (1, -1.0, 1.0),
    "1-real-below-fake": (1, 0.5, 2.0),  # s_r = 0.62 >= alpha1 but s_r < s_f - delta
    "2": (2, -1.0, -2.0),
    "3": (3, 2.0, -1.0),
    "4": (4, 2.0, 1.0),
    "5": (5, 0.5, 0.0),
}


def offset_batches(t_r, t_f, device):
    base = rand(8, 2, seed=3, scale=0.1) + 1.0
    real = torch.cat((base, torch.full((8, 1), t_r, dtype=F64)), 1)
    fake = torch.cat((base, torch.full((8, 1), t_f, dtype=F64)), 1)
    return real.to(device), fake.to(device)


@on_aw_backends
@pytest.mark.parametrize("normalized", [True, False], ids=["alg1", "alg2"])
@pytest.mark.parametrize("spec", CASES.values(), ids=CASES.keys())
def test_awloss_every_case_matches_official(spec, normalized, device, backend):
    case, t_r, t_f = spec
    real, fake = offset_batches(t_r, t_f, device)

    def forward(net):
        real_logits, fake_logits = net(real), net(fake)
        return (*lsgan(real_logits, fake_logits), real_logits, fake_logits)

    got = check_against_oracle(*run_both(OffsetD().to(device), forward, normalized=normalized))
    assert got == case, f"the test's logits hit case {got}, meant {case}"


# s_r = 0.27 (t_r = -1) against alpha1, alpha2 and delta moved away from their defaults; the LSGAN
# coefficients are both negative here, so rf > 0.
HYPER = {
    "alpha1-low": (-1.0, -1.0, dict(alpha1=0.2, alpha2=0.9, delta=0.1, eps=0.01), 5),
    "alpha2-low": (-1.0, -1.0, dict(alpha1=0.2, alpha2=0.25, eps=0.2), 4),
    "delta-0.05": (-1.0, -0.7, dict(alpha1=0.2, alpha2=0.25, delta=0.05), 2),  # 0.27 < 0.33 - 0.05
    "delta-0.1": (-1.0, -0.7, dict(alpha1=0.2, alpha2=0.25, delta=0.1), 4),  # 0.27 > 0.33 - 0.1
}


@on_aw_backends
@pytest.mark.parametrize("normalized", [True, False], ids=["alg1", "alg2"])
@pytest.mark.parametrize("spec", HYPER.values(), ids=HYPER.keys())
def test_awloss_custom_hyperparameters(spec, normalized, device, backend):
    t_r, t_f, hyper, case = spec
    real, fake = offset_batches(t_r, t_f, device)

    def forward(net):
        real_logits, fake_logits = net(real), net(fake)
        return (*lsgan(real_logits, fake_logits), real_logits, fake_logits)

    got = check_against_oracle(*run_both(OffsetD().to(device), forward, normalized=normalized,
                                         **hyper))
    assert got == case, f"the test's logits hit case {got}, meant {case}"


NETS = {
    "mlp": (lambda: mlp(2, 1), (32, 2)),
    "conv": (conv_d, (6, 1, 8, 8)),
    "conv-channels-last": (lambda: conv_d().to(memory_format=torch.channels_last), (6, 1, 8, 8)),
    "alias": (AliasD, (16, 4)),
}


@on_aw_backends
@pytest.mark.parametrize("normalized", [True, False], ids=["alg1", "alg2"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("net", NETS)
def test_awloss_matches_official(net, loss, normalized, device, backend):
    make_d, shape = NETS[net]
    forward = sample_forward(LOSSES[loss], shape, device=device)
    check_against_oracle(*run_both(make_d().to(device), forward, normalized=normalized))


def test_alias_d_really_produces_shared_and_expanded_gradients():
    D = AliasD()
    g = torch.autograd.grad(D(rand(5, 4)).mean(), [D.a, D.b, D.c, D.t])
    assert g[0].untyped_storage().data_ptr() == g[1].untyped_storage().data_ptr()
    assert 0 in g[2].stride()
    assert g[3].stride() != D.t.stride() and g[3].t().is_contiguous()


@on_aw_backends
def test_awloss_frozen_unused_and_one_sided_parameters(device, backend):
    real, fake = rand(16, 2, seed=1, device=device), rand(16, 2, seed=2, device=device) + 1

    def forward(net):
        real_logits, fake_logits = net(real, True), net(fake, False)
        return (*hinge(real_logits, fake_logits), real_logits, fake_logits)

    def preset(net):
        net.frozen.weight.grad = sentinel  # a frozen parameter is not the scheme's business
        # stale: gone, as after zero_grad()
        net.unused.grad = torch.ones(3, dtype=F64, device=device)

    sentinel = rand(8, 2, seed=9, device=device)
    before = sentinel.clone()
    D, D_oracle, aw, loss, expected = run_both(PartialD().to(device), forward, preset=preset)
    check_against_oracle(D, D_oracle, aw, loss, expected)
    assert D.frozen.weight.grad is sentinel and torch.equal(sentinel, before)
    assert D.frozen.bias.grad is None
    assert D.unused.grad is None
    assert D.real_only.grad is not None and D.fake_only.grad is not None


@on_aw_backends
def test_awloss_overwrites_previous_grad_in_place_or_replaces_it(device, backend):
    make_d, shape = NETS["conv"]
    forward = sample_forward(bce, shape, seed=4, device=device)
    olds = {}

    def preset(net):
        for i, p in enumerate(net.parameters()):
            # dense stale gradients are overwritten in place; an expanded one is replaced
            p.grad = (torch.full((), 7.0, dtype=F64, device=device).expand(p.shape) if i == 0
                      else rand(*p.shape, seed=100 + i, scale=1e3, device=device))
            olds[i] = p.grad

    D, *rest = run_both(make_d().to(device), forward, preset=preset)
    check_against_oracle(D, *rest)
    for i, p in enumerate(D.parameters()):
        assert (p.grad is olds[i]) == (i != 0), i


@on_aw_backends
def test_awloss_leaves_tensors_it_does_not_own_alone(device, backend):
    # p1's stale .grad is also p2's gradient: it is replaced, not written in place, so p2's
    # input is never overwritten (a fused kernel could read what it already wrote)
    forward = sample_forward(bce, (16, 2), device=device)

    def preset(net):
        net.p1.grad = net.given

    D, *rest = run_both(HandsD().to(device), forward, preset=preset)
    given = D.given.clone()
    check_against_oracle(D, *rest)
    assert D.p1.grad is not D.given and D.p2.grad is not D.given
    assert torch.equal(D.given, given)


@on_aw_backends
def test_awloss_does_not_write_into_a_gradient_a_hook_kept(device, backend):
    forward = sample_forward(hinge, (16, 2), device=device)
    kept = []
    D = mlp(2, 1).to(device)
    D[0].weight.register_hook(lambda g: kept.append((g, g.clone())))
    check_against_oracle(*run_both(D, forward))
    assert len(kept) == 2
    for g, value in kept:
        assert torch.equal(g, value)


@on_aw_backends
def test_awloss_replaces_a_stale_grad_that_is_part_of_a_graph(device, backend):
    # a .grad from create_graph=True has a grad_fn; writing into it would keep that
    # graph alive and make the new .grad differentiable
    forward = sample_forward(bce, (16, 2), device=device)

    def preset(net):
        params = list(net.parameters())
        grads = torch.autograd.grad(sum(forward(net)[:2]), params, create_graph=True)
        for p, g in zip(params, grads):
            p.grad = g
        assert all(p.grad.requires_grad for p in net.parameters())

    D, *rest = run_both(mlp(2, 1).to(device), forward, preset=preset)
    check_against_oracle(D, *rest)
    for p in D.parameters():
        assert not p.grad.requires_grad and p.grad.grad_fn is None
        p.grad = None  # drop the create_graph graph


class MixedD(nn.Module):
    """A discriminator with a float32 and a float64 layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(2, 8)  # float32
        self.b = nn.Linear(8, 1).double()

    def forward(self, x):
        return self.b(nnf.leaky_relu(self.a(x.float()), 0.2).double())


@on_aw_backends
def test_awloss_mixed_dtypes(device, backend):
    forward = sample_forward(bce, (16, 2), device=device)
    D, D_oracle, aw, loss, expected = run_both(MixedD().to(device), forward)
    assert aw.last_weights[0].dtype == F64
    _, e_r, e_f, e_case = expected
    assert int(aw.last_case) == e_case
    # float32 gradients: float32 tolerance for the weights (norms) and the float32 grads
    torch.testing.assert_close(aw.last_weights[0].item(), e_r, rtol=1e-5, atol=0)
    torch.testing.assert_close(aw.last_weights[1].item(), e_f, rtol=1e-5, atol=0)
    for p, q in zip(D.parameters(), D_oracle.parameters()):
        assert p.grad.dtype == p.dtype
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


@on_aw_backends
def test_awloss_one_forward_on_concatenated_batch(device, backend):
    # Real and fake logits from one forward: the losses share the graph, the first pass keeps it.
    real, fake = rand(16, 2, seed=1, device=device), rand(16, 2, seed=2, device=device) + 1

    def forward(net):
        logits = net(torch.cat((real, fake)))
        real_logits, fake_logits = logits[:16], logits[16:]
        return (*hinge(real_logits, fake_logits), real_logits, fake_logits)

    check_against_oracle(*run_both(mlp(2, 1).to(device), forward))


@on_aw_backends
def test_awloss_frees_the_graphs_like_backward(device, backend):
    D = mlp(2, 1).to(device)
    real_logits = D(rand(8, 2, seed=1, device=device))
    fake_logits = D(rand(8, 2, seed=2, device=device))
    loss_real, loss_fake = bce(real_logits, fake_logits)
    AWLoss(D).backward(loss_real, loss_fake, real_logits, fake_logits)
    for loss in (loss_real, loss_fake):
        with pytest.raises(RuntimeError, match="second time"):
            loss.backward()


@on_aw_backends
def test_awloss_training_loop_matches_official(device, backend):
    """Three Adam steps: the .grad tensors AWLoss leaves behind are reused in the next step."""
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 2, generator=gen, dtype=F64).to(device),
                torch.randn(16, 2, generator=gen, dtype=F64).to(device) + 1) for _ in range(3)]
    D, D_oracle = mlp(2, 1).to(device), mlp(2, 1).to(device)
    opt, opt_oracle = (torch.optim.Adam(d.parameters(), lr=1e-2) for d in (D, D_oracle))
    aw = AWLoss(D)
    for real, fake in batches:
        out = []
        for net in (D, D_oracle):
            real_logits, fake_logits = net(real), net(fake)
            out.append((*hinge(real_logits, fake_logits), real_logits, fake_logits))
        aw.backward(*out[0])
        official_aw(D_oracle, *out[1])
        opt.step()
        opt_oracle.step()
    for p, q in zip(D.parameters(), D_oracle.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


@on_aw_backends
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_awloss_half_precision_discriminator(dtype, device, backend):
    # float32 inner products and weights, one rounding of the combined gradient to dtype
    forward = sample_forward(bce, (32, 2), dtype=dtype, device=device)
    D, D_oracle, aw, loss, expected = run_both(mlp(2, 1).to(dtype).to(device), forward)
    assert aw.last_weights[0].dtype == torch.float32 and loss.dtype == dtype
    assert int(aw.last_case) == expected[3]
    for p, q in zip(D.parameters(), D_oracle.parameters()):
        assert_close(p.grad, q.grad.double(), dtype, "half-precision grad")
    assert_own_grads(D)


@on_aw_backends
def test_awloss_results_are_device_tensors_and_loss_dtype(device, backend):
    D = mlp(2, 1).float().to(device)
    real_logits = D(rand(8, 2, seed=1, device=device).float())
    fake_logits = D(rand(8, 2, seed=2, device=device).float())
    aw = AWLoss(D)
    assert aw.last_weights is None and aw.last_case is None
    loss = aw.backward(*hinge(real_logits, fake_logits), real_logits, fake_logits)
    assert loss.dtype == torch.float32 and loss.shape == ()
    w_r, w_f = aw.last_weights
    for t in (w_r, w_f, aw.last_case):
        assert isinstance(t, torch.Tensor) and t.shape == () and t.device.type == device
    assert aw.last_case.dtype == torch.int64 and w_r.dtype == torch.float32
    assert "normalized=True" in repr(aw)
    # one-element losses of shape (1,), as backward() accepts them: the result is 0-d
    real_logits = D(rand(8, 2, seed=3, device=device).float())
    fake_logits = D(rand(8, 2, seed=4, device=device).float())
    loss_real, loss_fake = hinge(real_logits, fake_logits)
    loss = aw.backward(loss_real.reshape(1), loss_fake.reshape(1, 1), real_logits, fake_logits)
    w_r, w_f = aw.last_weights
    assert loss.shape == ()
    torch.testing.assert_close(loss, w_r * loss_real.detach() + w_f * loss_fake.detach())


def test_awloss_and_brc_read_no_value_on_the_host():
    # On the meta device every .item(), bool(t), float(t), .cpu() value read raises.
    with torch.device("meta"):
        D, G = mlp(2, 1).to("meta"), mlp(2, 2).to("meta")
        real, z = torch.randn(8, 2), torch.randn(8, 2)
    real_logits, fake_logits = D(real), D(G(z).detach())
    aw = AWLoss(D)
    loss = aw.backward(*bce(real_logits, fake_logits), real_logits, fake_logits)
    assert loss.device.type == "meta" and aw.last_case.device.type == "meta"
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in D.parameters())

    fake_logits = D(G(z))
    r = BRC(G, D).backward(nnf.softplus(-fake_logits).mean(), sum(bce(D(real), fake_logits)))
    assert r.device.type == "meta" and r.shape == ()
    assert all(p.grad is not None for p in G.parameters())


def make_losses(D):
    real_logits, fake_logits = D(rand(8, 2, seed=1)), D(rand(8, 2, seed=2))
    return (*hinge(real_logits, fake_logits), real_logits, fake_logits)


def test_awloss_rejects_bad_construction():
    with pytest.raises(TypeError, match="discriminator"):
        AWLoss([nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="discriminator has no parameter with requires_grad"):
        AWLoss(mlp(2, 1).requires_grad_(False))
    with pytest.raises(TypeError, match="normalized"):
        AWLoss(mlp(2, 1), normalized=1)
    with pytest.raises(TypeError, match="alpha2"):
        AWLoss(mlp(2, 1), alpha2=torch.tensor(0.7))
    with pytest.raises(TypeError, match="eps"):
        AWLoss(mlp(2, 1), eps="0.05")


def test_awloss_rejects_bad_calls():
    D = mlp(2, 1)
    aw = AWLoss(D)
    lr, lf, rl, fl = make_losses(D)
    with pytest.raises(ValueError, match="loss_real must be a scalar"):
        aw.backward(torch.relu(1 - rl), lf, rl, fl)
    with pytest.raises(ValueError, match="loss_fake does not require grad"):
        aw.backward(lr, lf.detach(), rl, fl)
    with pytest.raises(TypeError, match="loss_real"):
        aw.backward(1.0, lf, rl, fl)
    with pytest.raises(TypeError, match="fake_logits"):
        aw.backward(lr, lf, rl, fl.tolist())
    with pytest.raises(ValueError, match="real_logits must not be empty"):
        aw.backward(lr, lf, rl[:0], fl)
    with pytest.raises(ValueError, match="loss_fake is on meta"):
        aw.backward(lr, torch.ones((), device="meta", requires_grad=True), rl, fl)
    other = mlp(2, 1, seed=5)
    with pytest.raises(ValueError, match="loss_real does not depend on any trainable"):
        aw.backward(other(rand(4, 2)).mean(), lf, rl, fl)
    D.requires_grad_(False)
    with pytest.raises(ValueError, match="discriminator has no parameter with requires_grad"):
        aw.backward(lr, lf, rl, fl)
    D.requires_grad_(True)
    # none of the rejected calls touched a gradient or freed the graph
    assert all(p.grad is None for p in D.parameters())
    aw.backward(lr, lf, rl, fl)
    assert all(p.grad is not None for p in D.parameters())


# ------------------------------------------------------------------------------------ BRC


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
