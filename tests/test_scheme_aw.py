"""AWLoss (design §4, §7.1) against the official aw-loss procedure written here: ``backward()``
per term, clone the gradients, ``torch.cat`` them, three ``torch.dot(...).item()``, the rule in
plain Python, a per-parameter write-back. Everything runs in float64 so the comparison is tight.

Every test that reaches an op runs once per backend that implements the scheme's ops
(multi_dot, aw_weights, aw_combine_; ``helpers.cases``: reference and cpu on CPU tensors,
triton and cuda on CUDA tensors, triton on CPU tensors under TRITON_INTERPRET=1), so the
reference kernels are checked here too and not only the one ``auto`` picks. Tests of pure
argument checking, of the test networks themselves and of the meta device run once.
"""

from __future__ import annotations

import copy

import pytest
import torch
from awrule import oracle_rule
from helpers import assert_close, cases
from schemenets import (
    F64,
    AliasD,
    HandsD,
    MixedD,
    OffsetD,
    PartialD,
    assert_own_grads,
    bce,
    close,
    conv_d,
    hinge,
    mlp,
    rand,
)
from torch import nn

from nats_kernels.schemes import AWLoss

pytestmark = pytest.mark.single_thread


on_aw_backends = pytest.mark.parametrize("device,backend",
                                         cases("multi_dot", "aw_weights", "aw_combine_"))


# -------------------------------------------------------------------------------- losses


def lsgan(real_logits, fake_logits):
    return 0.5 * ((real_logits - 1) ** 2).mean(), 0.5 * (fake_logits**2).mean()


LOSSES = {"hinge": hinge, "bce": bce, "lsgan": lsgan}


# ------------------------------------------------------------------------- aw-loss oracle


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
    rr = torch.dot(real_list, real_list).item()
    ff = torch.dot(fake_list, fake_list).item()
    rf = torch.dot(real_list, fake_list).item()
    s_r = torch.mean(torch.sigmoid(real_logits.double())).item()
    s_f = torch.mean(torch.sigmoid(fake_logits.double())).item()
    w_r, w_f, case = oracle_rule([rr, ff, rf], s_r, s_f, normalized, **hyper)
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


def test_awloss_reads_no_value_on_the_host():
    # On the meta device every .item(), bool(t), float(t), .cpu() value read raises.
    with torch.device("meta"):
        D, G = mlp(2, 1).to("meta"), mlp(2, 2).to("meta")
        real, z = torch.randn(8, 2), torch.randn(8, 2)
    real_logits, fake_logits = D(real), D(G(z).detach())
    aw = AWLoss(D)
    loss = aw.backward(*bce(real_logits, fake_logits), real_logits, fake_logits)
    assert loss.device.type == "meta" and aw.last_case.device.type == "meta"
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in D.parameters())


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


