"""The gradient-list helpers that :class:`~nats_kernels.schemes.AWLoss` and
:class:`~nats_kernels.schemes.BRC` share: which parameters take part, whether two losses share
an autograd graph, and when a freshly returned gradient may be written in place and kept as
``.grad``. Metadata only: nothing here reads a tensor's value."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import _validate as v
from .._compat import has_tensor_hooks


def module(name: str, m) -> nn.Module:
    """``m`` itself when it is an ``nn.Module`` (TypeError naming ``name`` otherwise)."""
    if not isinstance(m, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
    return m


def trainable(name: str, m: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``m`` that require grad (tied parameters once), on one device."""
    params = [p for p in m.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"{name} has no parameter with requires_grad=True (is it frozen with "
            f"requires_grad_(False)?)"
        )
    device = params[0].device
    for p in params:
        if p.device != device:
            raise ValueError(
                f"{name} has parameters on {device} and on {p.device}; all trainable parameters "
                f"must be on one device"
            )
        if p.dtype not in v.FLOATING:
            raise TypeError(f"{name} has a trainable parameter of dtype {p.dtype}")
    return params


def loss(name: str, t, device: torch.device) -> Tensor:
    """A loss that ``backward()`` would accept: one element, floating, part of a graph."""
    v.tensor(name, t)
    if t.numel() != 1:
        raise ValueError(f"{name} must be a scalar loss (one element), got shape {tuple(t.shape)}")
    if not t.requires_grad:
        raise ValueError(
            f"{name} does not require grad: it was computed under torch.no_grad() or from "
            f"detached tensors, so it has no gradient to take"
        )
    v.same_device(device, **{name: t})
    return t


def _accumulate_grad_type() -> type:
    """The class of autograd's leaf nodes (``AccumulateGrad``), which torch does not export."""
    leaf = torch.zeros((), requires_grad=True)
    return type(leaf.expand(1).grad_fn.next_functions[0][0])


_ACCUMULATE_GRAD = _accumulate_grad_type()


def shares_graph(a: Tensor, b: Tensor) -> bool:
    """Whether the autograd graphs behind ``a`` and ``b`` have a node in common other than the
    parameter leaves. Only then must a first backward pass from one keep its graph for a second
    pass from the other (e.g. one discriminator forward on ``cat(real, fake)``, or both losses
    computed from the same fake logits). The two graphs are walked breadth first, one level of
    each in turn, so a shared node near the roots is found early; disjoint graphs are walked
    whole (each node once: it is the cost of this test, a few microseconds per node in Python).
    Leaves (``AccumulateGrad``) are not entered: they have no successors and do not count.
    Metadata only: it follows ``grad_fn``, it reads no tensor value."""
    root_a, root_b = a.grad_fn, b.grad_fn
    if root_a is None or root_b is None:
        return False
    if root_a is root_b:
        return True
    leaf = _ACCUMULATE_GRAD
    seen_a, seen_b = {root_a}, {root_b}
    level_a, level_b = [root_a], [root_b]
    while level_a or level_b:
        # one level of a's walk, then one of b's: a node found by both walks is shared
        for level, seen, other in ((level_a, seen_a, seen_b), (level_b, seen_b, seen_a)):
            nxt = []
            for fn in level:
                for child, _ in fn.next_functions:
                    if child is None or child in seen or type(child) is leaf:
                        continue
                    if child in other:
                        return True
                    seen.add(child)
                    nxt.append(child)
            level[:] = nxt
    return False


def storage_key(t: Tensor) -> int:
    """Which memory ``t`` lives in: the address of its storage. The keys of one call are
    compared among themselves only, and all its tensors are on one device: the parameters are
    checked to be, autograd returns each gradient on its input's device and torch refuses a
    ``.grad`` on another device than its parameter's."""
    return t.untyped_storage().data_ptr()


def storage_counts(*lists: Sequence[Tensor | None]) -> Counter:
    """How many tensors of the given lists (``None`` entries skipped) live in each storage."""
    return Counter(storage_key(t) for ts in lists for t in ts if t is not None)


def writable_as_grad(t: Tensor | None, p: Tensor, counts: Counter) -> bool:
    """Whether ``t``, a gradient autograd just returned for ``p``, may be written in place and
    kept as ``p.grad`` (what AccumulateGrad does with a gradient nobody else holds): ``p``'s
    strides (so not expanded, not transposed), no other gradient of this call in the same storage
    (autograd may hand one tensor to several inputs, e.g. both operands of an add), and no tensor
    hook on ``p`` (a hook may have kept the very tensor)."""
    return (
        t is not None
        and not has_tensor_hooks(p)
        and t.stride() == p.stride()
        and counts[storage_key(t)] == 1
    )


def zeros(p: Tensor, cache: dict) -> Tensor:
    """A read-only zero gradient shaped like ``p`` (an expanded 0-d tensor: no allocation), the
    0-d tensor made once per (device, dtype) in ``cache``."""
    key = (p.device, p.dtype)
    if key not in cache:
        cache[key] = torch.zeros((), device=p.device, dtype=p.dtype)
    return cache[key].expand(p.shape)


def scalar(loss: Tensor) -> Tensor:
    """``loss.detach().reshape(())``: a detached 0-d tensor of a one-element loss (no reshape
    call when it is 0-d already)."""
    t = loss.detach()
    return t if t.dim() == 0 else t.reshape(())


def to(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call when ``t`` already has that dtype (``to`` returns ``t``
    itself then)."""
    return t if t.dtype == dtype else t.to(dtype)
