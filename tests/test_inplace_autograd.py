"""What the in-place ops do with tensors autograd knows about, and with shared memory.

PyTorch's own rules, on every backend:
- a leaf tensor that requires grad (a parameter), or a view of one, is written only under
  ``torch.no_grad()``; otherwise RuntimeError and the tensor untouched;
- an out= argument (``cfg_accumulate(out=)``, ``aw_combine_``'s ``out``) that requires grad is
  refused outside ``no_grad``: it is overwritten, not differentiated;
- a non-leaf tensor of a graph updated in place (``cfg_step_``'s ``x``, ``iga_correction_``'s
  ``g_G``) has its version counter bumped, so ``backward()`` raises when autograd saved its
  old value.
And two written tensors that share memory are refused (a write-write conflict); inputs may
overlap outputs, and written tensors may share a buffer without sharing an element
(tests/test_aliasing.py checks the results then, on every backend).
"""

from __future__ import annotations

import pytest
import torch
from helpers import cases

import nats_kernels as nk

N = 7


def _t(seed, n=N, **kw):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), **kw)


# Each op as a call that writes into `target` (and reads fresh tensors otherwise).
WRITERS = {
    "cfg_step_": lambda target: nk.cfg_step_(target, _t(1), 0.5),
    "cfg_accumulate": lambda target: nk.cfg_accumulate(_t(1), [_t(2)], torch.ones(1), out=target),
    "aw_combine_": lambda target: nk.aw_combine_([target], [_t(1)], [_t(2)], 1.0, 1.0),
    "iga_correction_": lambda target: nk.iga_correction_([target], [_t(1)], 0.5),
}
OPS = {"cfg_step_": "cfg_step_", "cfg_accumulate": "cfg_accumulate_list",
       "aw_combine_": "aw_combine_", "iga_correction_": "iga_correction_"}
UPDATES = ("cfg_step_", "iga_correction_")  # x += ... : non-leaf tensors of a graph allowed


def _params():
    return [pytest.param(name, device, backend, id=f"{name}-{device}-{backend}")
            for name in WRITERS for device, backend in
            (p.values for p in cases(OPS[name]))]


@pytest.mark.parametrize("name, device, backend", _params())
def test_leaf_requiring_grad_is_refused_and_untouched(name, device, backend):
    p = _t(0, device=device).requires_grad_()
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="leaf tensor that requires grad.*torch.no_grad"):
        WRITERS[name](p)
    assert torch.equal(p.detach(), before)
    assert p._version == 0


@pytest.mark.parametrize("name, device, backend", _params())
def test_view_of_leaf_requiring_grad_is_refused(name, device, backend):
    p = torch.randn(2, N, device=device, requires_grad=True)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="view of a leaf tensor that requires grad"):
        WRITERS[name](p[1])
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("name, device, backend", _params())
def test_no_grad_view_of_tensor_requiring_grad_is_refused_in_grad_mode(name, device, backend):
    p = torch.randn(2, N, device=device, requires_grad=True)
    with torch.no_grad():
        row = p[1]  # a view made under no_grad: PyTorch refuses in-place writes to it later
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="view created under torch.no_grad"):
        WRITERS[name](row)
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("name, device, backend", _params())
def test_leaf_requiring_grad_is_written_under_no_grad(name, device, backend):
    """What an optimizer does: the write happens, with the same values as on a plain tensor."""
    p = _t(0, device=device).requires_grad_()
    plain = _t(0, device=device)
    with torch.no_grad():
        WRITERS[name](p)
        WRITERS[name](plain)
    assert torch.equal(p.detach(), plain)
    assert p.requires_grad and p.is_leaf


def test_parameters_passed_for_their_grads():
    """The issue's example: D's parameters where their .grad was meant; the weights survive."""
    D = torch.nn.Linear(3, 2)
    g = [torch.randn_like(q) for q in D.parameters()]
    before = [q.detach().clone() for q in D.parameters()]
    with pytest.raises(RuntimeError, match=r"out\[0\] is a leaf tensor that requires grad"):
        nk.aw_combine_(list(D.parameters()), g, g, 1.0, 1.0)
    assert all(torch.equal(q.detach(), b) for q, b in zip(D.parameters(), before))


@pytest.mark.parametrize("name, device, backend", [p for p in _params() if p.values[0] in UPDATES])
def test_non_leaf_update_bumps_version_and_backward_sees_it(name, device, backend):
    x = _t(0, device=device).requires_grad_()
    y = x * 2  # a non-leaf of a graph
    z = (y * y).sum()  # saves y for its backward
    v0 = y._version
    WRITERS[name](y)
    assert y._version > v0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()


@pytest.mark.parametrize("name, device, backend", [p for p in _params() if p.values[0] in UPDATES])
def test_non_leaf_update_is_the_identity_for_the_updated_tensor(name, device, backend):
    """x + c * g with g, c constants: d/dx is the identity, nothing else is differentiated."""
    x = _t(0, device=device).requires_grad_()
    y = x * 3
    WRITERS[name](y)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))


@pytest.mark.parametrize("name, device, backend",
                         [p for p in _params() if p.values[0] not in UPDATES])
def test_out_requiring_grad_is_refused(name, device, backend):
    x = _t(0, device=device).requires_grad_()
    y = x * 2
    with pytest.raises(RuntimeError, match="requires grad, but it is overwritten"):
        WRITERS[name](y)
    assert y._version == 0
    with torch.no_grad():
        WRITERS[name](y)  # allowed where PyTorch's out= functions allow it


# --------------------------------------------------------------------------- shared memory


def test_one_tensor_twice_in_out_is_refused():
    t, g = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match=r"out\[0\] and out\[1\] share memory"):
        nk.aw_combine_([t, t], [g, g], [g, 2 * g], 1.0, 1.0)
    assert torch.equal(t, torch.zeros(4))
    with pytest.raises(ValueError, match=r"g_G\[0\] and g_G\[1\] share memory"):
        nk.iga_correction_([t, t], [g, g], 1.0)
    buf = torch.zeros(6)  # overlapping views of one buffer
    with pytest.raises(ValueError, match="share memory"):
        nk.aw_combine_([buf[:4], buf[2:]], [g, g], [g, g], 1.0, 1.0)
    assert torch.equal(buf, torch.zeros(6))


def test_outputs_on_the_meta_device_have_no_addresses_to_compare():
    out = [torch.empty(3, device="meta") for _ in range(3)]
    nk.aw_combine_(out, out, out, 1.0, 1.0)  # shape propagation only; no false "share memory"
