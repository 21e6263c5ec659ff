"""design §1: annealed weights and the CFG functional-gradient accumulation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from .. import _dispatch
from .. import _validate as v
from .._dispatch import kernel

# ---------------------------------------------------------------------------------------------
# Custom ops: validated arguments in, one dispatch decision, one kernel.


@torch.library.custom_op("nats_kernels::annealed_weights", mutates_args=())
def _annealed_weights_op(
    first: float, last: float, M: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    return kernel("annealed_weights", device)(first, last, M, device, dtype)


@_annealed_weights_op.register_fake
def _(first, last, M, device, dtype):
    return torch.empty(M, device=device, dtype=dtype)


@torch.library.custom_op("nats_kernels::cfg_accumulate", mutates_args=("out",))
def _cfg_accumulate_op(
    x0: Tensor, grads: Tensor, weights: Tensor, eta: float, scale: Tensor | None, out: Tensor
) -> None:
    _dispatch.route("cfg_accumulate", x0.device)(x0, grads, weights, eta, scale, out)


@torch.library.custom_op("nats_kernels::cfg_accumulate_list", mutates_args=("out",))
def _cfg_accumulate_list_op(
    x0: Tensor,
    grads: list[Tensor],
    weights: Tensor,
    eta: float,
    scale: Tensor | None,
    out: Tensor,
) -> None:
    _dispatch.route("cfg_accumulate_list", x0.device)(x0, grads, weights, eta, scale, out)


@torch.library.custom_op("nats_kernels::cfg_step_", mutates_args=("x",))
def _cfg_step_op(x: Tensor, grad: Tensor, weight: Tensor, eta: float, scale: Tensor | None) -> None:
    _dispatch.route("cfg_step_", x.device)(x, grad, weight, eta, scale)


for _op in (_cfg_accumulate_op, _cfg_accumulate_list_op, _cfg_step_op):
    _op.register_fake(lambda *args: None)


# ---------------------------------------------------------------------------------------------
# Public functions.


def annealed_weights(
    first: float,
    last: float,
    M: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The annealed weight vector of NATS: a geometric progression from ``first`` to ``last``.

    ``w[m] = first * (last / first) ** (m / (M - 1))`` for ``m = 0 .. M-1``; ``M = 1`` gives
    ``[first]``. ``first > last`` is the paper's decreasing schedule (``[1, 0.01]`` below
    128x128, ``[20, 1]`` at 256x256); ``first < last`` the "reverse" ablation; equal values give
    plain CFG / NTS.

    Args:
        first, last: positive finite Python numbers.
        M: number of steps, a Python int >= 1.
        device: where the result lives (default: the current default device).
        dtype: a floating dtype (default float32) that can hold ``first`` and ``last``;
            computed in float64 (through logarithms when ``last / first`` leaves float64's
            range), the ends exactly ``first`` and ``last``, then cast.

    Returns:
        A new ``(M,)`` tensor.

    Raises:
        TypeError: non-number ``first``/``last``, non-int ``M``, non-floating ``dtype``.
        ValueError: ``first``/``last`` not positive and finite, ``M < 1``, a ``dtype`` in which
            they would round to inf or to zero.
    """
    first = v.positive("first", first)
    last = v.positive("last", last)
    M = v.integer("M", M, minimum=1)
    if dtype not in v.FLOATING:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    # The progression is monotonic: its extremes are first and last. Refuse a dtype in which
    # they would round to inf or to 0 (float16 tops out at 65504).
    info = torch.finfo(dtype)
    lo, hi = min(first, last), max(first, last)
    # rounded on the host: a CPU tensor of two Python floats, no device value is read
    lo_r, hi_r = torch.tensor([lo, hi], dtype=torch.float64).to(dtype).tolist()
    if math.isinf(hi_r) or lo_r == 0:
        raise ValueError(
            f"dtype {dtype} cannot hold the weights: they span [{lo:g}, {hi:g}], {dtype} holds "
            f"[{info.tiny * info.eps:g}, {info.max:g}] (ask for a wider dtype)"
        )
    if device is None:
        device = torch.get_default_device()
    else:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device: {device!r} is not a torch device ({e})") from None
    return _annealed_weights_op(first, last, M, device, dtype)


def _fold_eta(eta, weights: Tensor, acc: torch.dtype) -> tuple[float, Tensor]:
    """Python eta goes to the kernel as a float; a 0-d tensor eta is folded into the weights on
    device (a tiny op on M values) so its value is never read on the host."""
    if isinstance(eta, Tensor):
        v.tensor("eta", eta)
        if eta.dim() != 0:
            raise ValueError(f"eta must be a number or a 0-d tensor, got shape {tuple(eta.shape)}")
        v.same_device(weights.device, eta=eta)
        return 1.0, weights * eta
    return v.finite("eta", eta, dtype=acc), weights


def _check_scale(scale: Tensor | None, x: Tensor, x_name: str, expected_rows: tuple[int, ...]):
    if scale is None:
        return
    v.tensor("scale", scale)
    if x.dim() == 0:
        raise ValueError(f"scale needs a batch dimension, but {x_name} is 0-d")
    v.same_device(x.device, scale=scale)
    v.shape("scale", scale, expected_rows + (x.shape[0],))


def cfg_accumulate(
    x0: Tensor,
    grads: Tensor | Sequence[Tensor],
    weights: Tensor,
    eta: float | Tensor = 1.0,
    scale: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """All M functional-gradient steps of (annealed) CFG in one pass over memory.

    ``out = x0 + eta * sum_m weights[m] * scale[m] * grads[m]`` where ``scale[m]`` (one value per
    sample, shape ``(B,)``) broadcasts over each sample's other dimensions.

    Args:
        x0: ``(B, ...)`` starting samples (any shape if ``scale`` is None), floating dtype.
        grads: a tensor ``(M, *x0.shape)`` or a list/tuple of M tensors shaped like ``x0``; same
            dtype and device as ``x0``. A list is read in place, never stacked.
        weights: ``(M,)`` floating tensor on ``x0``'s device, e.g. :func:`annealed_weights`.
        eta: step size, a finite Python number or a 0-d floating tensor (kept on device).
        scale: optional ``(M, B)`` floating per-sample factors ``s_m`` (e.g. ``sigmoid(-D)``).
        out: optional tensor shaped like ``x0`` with its dtype and device to write into; it may
            be ``x0`` itself for an in-place update. Default: a new tensor.

    Returns:
        ``out`` (x0's dtype). Math in float32, float64 for float64 inputs; one rounding at the end.
        Not differentiable (it moves samples along gradients already computed).

    Autograd: ``out`` is overwritten, not differentiated, so (as PyTorch's out= functions) an
    ``out`` that requires grad is refused outside ``torch.no_grad()``.

    Raises:
        TypeError: non-tensor or non-floating inputs, dtype differing from ``x0``.
        ValueError: M = 0, wrong shapes or list length, tensors on different devices, an
            ``out`` with overlapping memory.
        RuntimeError: an ``out`` that requires grad (or a view of one) outside
            ``torch.no_grad()``. Nothing is written when it raises.
    """
    if v.cpu_fast("cfg_accumulate" if isinstance(grads, Tensor) else "cfg_accumulate_list"):
        result = v.native.cpu_cfg_accumulate(x0, grads, weights, eta, scale, out)
        if result is not None:  # design §8.1: checked and run in C++
            return result
    v.tensor("x0", x0)
    v.tensor("weights", weights)
    if weights.dim() != 1 or weights.shape[0] == 0:
        raise ValueError(f"weights must have shape (M,) with M >= 1, got {tuple(weights.shape)}")
    M = weights.shape[0]
    device = x0.device
    v.same_device(device, weights=weights)
    if isinstance(grads, Tensor):
        v.tensor("grads", grads)
        v.same_device(device, grads=grads)
        v.same_dtype("grads", grads, x0.dtype, "x0")
        v.shape("grads", grads, (M, *x0.shape))
        name, op, listed = "cfg_accumulate", _cfg_accumulate_op, (grads,)
    else:
        grads = v.tensor_list("grads", grads)
        if len(grads) != M:
            raise ValueError(f"grads has {len(grads)} tensors but weights has M = {M} entries")
        for i, g in enumerate(grads):
            v.same_device(device, **{f"grads[{i}]": g})
            v.same_dtype(f"grads[{i}]", g, x0.dtype, "x0")
            v.shape(f"grads[{i}]", g, x0.shape)
        name, op, listed = "cfg_accumulate_list", _cfg_accumulate_list_op, grads
    _check_scale(scale, x0, "x0", (M,))
    eta, weights = _fold_eta(eta, weights, v.acc_dtype(x0.dtype))
    if out is None:
        out = torch.empty_like(x0)
    else:
        v.tensor("out", out)
        v.same_device(device, out=out)
        v.same_dtype("out", out, x0.dtype, "x0")
        v.shape("out", out, x0.shape)
        v.no_internal_overlap("out", out)
        v.out_arg("out", out)
    if _dispatch.eager(x0, (weights, scale, *listed)):  # design §8.1: no custom-op hop
        _dispatch.route(name, device)(x0, grads, weights, eta, scale, out)
        increment_version(out)
    else:
        op(x0, grads, weights, eta, scale, out)
    return out


def cfg_step_(
    x: Tensor,
    grad: Tensor,
    weight: float | Tensor,
    eta: float | Tensor = 1.0,
    scale: Tensor | None = None,
) -> Tensor:
    """One CFG step in place: ``x += eta * weight * scale * grad``.

    Args:
        x: ``(B, ...)`` samples (any shape if ``scale`` is None), floating dtype; updated in place.
        grad: shaped like ``x``, same dtype and device.
        weight, eta: finite Python numbers or 0-d floating tensors on ``x``'s device (kept on
            device; a tensor's value is not checked).
        scale: optional ``(B,)`` floating per-sample factors.

    Returns:
        ``x``. Math in float32 (float64 for float64 inputs), one rounding.

    Autograd (PyTorch's rules for in-place ops): a leaf ``x`` that requires grad, or a view of
    one, is written only under ``torch.no_grad()``, else RuntimeError. A non-leaf ``x`` of a
    graph is updated in place and its version counter bumped, so ``backward()`` raises if
    autograd saved its old value; the step is not differentiated with respect to ``grad``,
    ``weight``, ``eta`` or ``scale``.

    Raises:
        TypeError / ValueError as :func:`cfg_accumulate`; ValueError if ``x`` has overlapping
        memory; RuntimeError as above. Nothing is written when it raises.
    """
    if v.cpu_fast("cfg_step_") and v.native.cpu_cfg_step_(x, grad, weight, eta, scale):
        return x  # design §8.1: checked and run in C++
    common = v.common_lists(([x], [grad]), written=1)  # design §8.1: the common case in C++
    if not common:
        v.tensor("x", x)
        v.tensor("grad", grad)
        v.same_device(x.device, grad=grad)
        v.same_dtype("grad", grad, x.dtype, "x")
        v.shape("grad", grad, x.shape)
        v.no_internal_overlap("x", x)
        v.inplace("x", x)
    device = x.device
    _check_scale(scale, x, "x", ())
    weight = v.scalar("weight", weight, device, v.acc_dtype(x.dtype))
    eta, weight = _fold_eta(eta, weight, v.acc_dtype(x.dtype))
    if ((common and not (torch.is_grad_enabled() and (
            weight.requires_grad or (scale is not None and scale.requires_grad))))
            or _dispatch.eager(x, (grad, weight, scale))):  # design §8.1: no custom-op hop
        _dispatch.route("cfg_step_", device)(x, grad, weight, eta, scale)
        increment_version(x)
    else:
        _cfg_step_op(x, grad, weight, eta, scale)
    return x
