"""design §5: best-response constraint, implicit gradient approximation."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from .. import _dispatch
from .. import _validate as v


@torch.library.custom_op("nats_kernels::iga_ratio", mutates_args=())
def _iga_ratio_op(gf: list[Tensor], gF: list[Tensor], eps: float) -> Tensor:
    return _dispatch.route("iga_ratio", gf[0].device)(gf, gF, eps)


@_iga_ratio_op.register_fake
def _(gf, gF, eps):
    return gf[0].new_empty((), dtype=v.acc_dtype(gf[0].dtype))


@torch.library.custom_op("nats_kernels::iga_correction_", mutates_args=("g",))
def _iga_correction_op(g: list[Tensor], gf: list[Tensor], r: Tensor) -> None:
    _dispatch.route("iga_correction_", g[0].device)(g, gf, r)


_iga_correction_op.register_fake(lambda *args: None)


def iga_ratio(gf_D: Sequence[Tensor], gF_D: Sequence[Tensor], eps: float = 1e-12) -> Tensor:
    """The IGA ratio ``r = <df/dD, dF/dD> / (<df/dD, df/dD> + eps)`` (BRC paper, eq. 9).

    Args:
        gf_D: gradients of the discriminator loss f w.r.t. the discriminator parameters.
        gF_D: gradients of the generator loss F w.r.t. the same parameters, position by position
            the same shapes; one floating dtype and one device for both lists.
        eps: a non-negative Python number added to the denominator.

    Returns:
        A new 0-d tensor on device, float32 (float64 for float64 inputs). Sums run over all
        elements of all tensors in one pass. No host synchronization.

    Raises:
        TypeError / ValueError as :func:`nats_kernels.multi_dot`; ValueError for a negative or
        non-finite eps.
    """
    if v.cpu_fast("iga_ratio"):
        result = v.native.cpu_iga_ratio(gf_D, gF_D, eps)  # design §8.1: checked, run in C++
        if result is not None:
            return result
    if v.common_lists((gf_D, gF_D)):  # design §8.1: checked in one C++ pass, no custom-op hop
        eps = v.nonnegative("eps", eps)  # checked before the dispatch is asked for a kernel
        return _dispatch.route("iga_ratio", gf_D[0].device)(gf_D, gF_D, eps)
    (gf_D, gF_D), device, _ = v.paired_lists(("gf_D", "gF_D"), (gf_D, gF_D))
    eps = v.nonnegative("eps", eps)
    if _dispatch.eager(gf_D[0], itertools.chain(gf_D, gF_D)):  # design §8.1: no custom-op hop
        return _dispatch.route("iga_ratio", device)(gf_D, gF_D, eps)
    return _iga_ratio_op(gf_D, gF_D, eps)


def iga_correction_(g_G: Sequence[Tensor], gf_G: Sequence[Tensor], r: float | Tensor) -> None:
    """``g_G[p] -= r * gf_G[p]`` in place: the generator gradient dF/dG - r * df/dG.

    Args:
        g_G: generator gradients (dF/dtheta_G), updated in place.
        gf_G: df/dtheta_G, position by position the same shapes; one floating dtype and device.
        r: the ratio from :func:`iga_ratio`, a 0-d tensor (never read on the host) or a number.

    Math in float32 (float64 for float64 inputs), one rounding per element.

    Autograd (PyTorch's rules for in-place ops): a leaf ``g_G`` tensor that requires grad (a
    parameter), or a view of one, is written only under ``torch.no_grad()``, else
    RuntimeError. A non-leaf ``g_G`` tensor of a graph is updated in place and its version
    counter bumped, so ``backward()`` raises if autograd saved its old value; the update is not
    differentiated with respect to ``gf_G`` or ``r``.

    Raises:
        TypeError / ValueError as :func:`nats_kernels.multi_dot`; ValueError for a ``g_G`` tensor
        with overlapping memory, two ``g_G`` tensors sharing memory, a non-0-d ``r``;
        RuntimeError as above. Nothing is written when it raises.
    """
    if (isinstance(r, Tensor) and v.cpu_fast("iga_correction_")
            and v.native.cpu_iga_correction_(g_G, gf_G, r)):  # design §8.1: ran in C++
        return
    if v.common_lists((g_G, gf_G), written=1):  # design §8.1: one C++ pass
        device = g_G[0].device
        r = v.scalar("r", r, device, v.acc_dtype(g_G[0].dtype))
        if not (torch.is_grad_enabled() and r.requires_grad):
            _dispatch.route("iga_correction_", device)(g_G, gf_G, r)
            increment_version(g_G)
            return
    (g_G, gf_G), device, dtype = v.paired_lists(("g_G", "gf_G"), (g_G, gf_G))
    for i, t in enumerate(g_G):
        v.no_internal_overlap(f"g_G[{i}]", t)
    v.inplace_list("g_G", g_G)
    r = v.scalar("r", r, device, v.acc_dtype(dtype))
    v.disjoint_outputs("g_G", g_G)
    if _dispatch.eager(g_G[0], itertools.chain(g_G, gf_G, (r,))):  # design §8.1
        _dispatch.route("iga_correction_", device)(g_G, gf_G, r)
        increment_version(g_G)
    else:
        _iga_correction_op(g_G, gf_G, r)
