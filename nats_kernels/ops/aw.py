"""design §4: adaptive weighted discriminator loss — inner products, weight rule, combination."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from .. import _dispatch
from .. import _validate as v


@torch.library.custom_op("nats_kernels::multi_dot", mutates_args=())
def _multi_dot_op(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return _dispatch.route("multi_dot", a[0].device)(a, b)


@_multi_dot_op.register_fake
def _(a, b):
    return a[0].new_empty((3,), dtype=v.acc_dtype(a[0].dtype))


@torch.library.custom_op("nats_kernels::aw_weights", mutates_args=())
def _aw_weights_op(
    dots: Tensor,
    real_logits: Tensor,
    fake_logits: Tensor,
    normalized: bool,
    alpha1: float,
    alpha2: float,
    delta: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return _dispatch.route("aw_weights", dots.device)(
        dots, real_logits, fake_logits, normalized, alpha1, alpha2, delta, eps
    )


@_aw_weights_op.register_fake
def _(dots, real_logits, fake_logits, normalized, alpha1, alpha2, delta, eps):
    return dots.new_empty(()), dots.new_empty(()), dots.new_empty((), dtype=torch.int64)


@torch.library.custom_op("nats_kernels::aw_combine_", mutates_args=("out",))
def _aw_combine_op(
    out: list[Tensor], g_r: list[Tensor], g_f: list[Tensor], w_r: Tensor, w_f: Tensor
) -> None:
    _dispatch.route("aw_combine_", out[0].device)(out, g_r, g_f, w_r, w_f)


_aw_combine_op.register_fake(lambda *args: None)


def multi_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """``(<a,a>, <b,b>, <a,b>)`` over two lists of tensors, each inner product summed over all
    elements of all tensors, in one pass.

    Args:
        a, b: equal-length, non-empty lists of tensors; ``a[p]`` and ``b[p]`` have the same shape;
            one floating dtype and one device for all. Non-contiguous tensors are fine.

    Returns:
        A new ``(3,)`` tensor on the inputs' device, in float32 (float64 for float64 inputs) —
        the accumulation dtype, so half-precision gradients cannot overflow it.

    Raises:
        TypeError: not lists of floating tensors, mixed dtypes.
        ValueError: empty lists, different lengths or shapes, different devices.
    """
    if v.cpu_fast("multi_dot"):  # design §8.1: checked and run in C++ (None: not that case)
        result = v.native.cpu_multi_dot(a, b)
        if result is not None:
            return result
    if v.common_lists((a, b)):  # design §8.1: checked in one C++ pass, no custom-op hop
        return _dispatch.route("multi_dot", a[0].device)(a, b)
    (a, b), device, _ = v.paired_lists(("a", "b"), (a, b))
    if _dispatch.eager(a[0], itertools.chain(a, b)):  # design §8.1: no custom-op hop
        return _dispatch.route("multi_dot", device)(a, b)
    return _multi_dot_op(a, b)


def aw_weights(
    dots: Tensor,
    real_logits: Tensor,
    fake_logits: Tensor,
    *,
    normalized: bool = True,
    alpha1: float = 0.5,
    alpha2: float = 0.75,
    delta: float = 0.05,
    eps: float = 0.05,
) -> tuple[Tensor, Tensor, Tensor]:
    """The aw-loss weights ``(w_r, w_f)`` of design §4, decided on device.

    ``rr = dots[0] + 1e-4``, ``ff = dots[1] + 1e-4``, ``rf = dots[2]``;
    ``s_r = mean(sigmoid(real_logits))``, ``s_f = mean(sigmoid(fake_logits))``. Case 1/2 when
    ``s_r < alpha1 or s_r < s_f - delta`` (rf <= 0 / rf > 0), else case 3/4 when
    ``s_r > alpha2 and s_r > s_f - delta``, else case 5. ``normalized=True`` is Algorithm 1
    (1/||g|| factors), ``False`` Algorithm 2. Comparisons with NaN are false, as in the official
    Python code: a NaN ``s_r`` gives case 5, and a NaN ``rf`` fails ``rf <= 0`` and takes the
    rf > 0 column (case 2 or 4).

    Args:
        dots: ``(3,)`` floating tensor ``(<g_r,g_r>, <g_f,g_f>, <g_r,g_f>)``, e.g. from
            :func:`multi_dot`.
        real_logits, fake_logits: raw discriminator outputs, any non-empty shape, floating,
            on dots' device.
        normalized, alpha1, alpha2, delta, eps: Python values (configuration, not device values):
            a bool and finite numbers, ``eps >= 0``. The rule runs in float32 (float64 for
            float64 dots) whatever dots' dtype; the weights are rounded to dots' dtype once.

    Returns:
        ``(w_r, w_f, case)``: 0-d tensors on device; the weights in dots' dtype, ``case`` int64
        in 1..5 for logging. No host synchronization.

    Raises:
        TypeError: non-floating tensors, tensor-valued hyperparameters, a non-bool
            ``normalized``.
        ValueError: ``dots`` not of shape ``(3,)``, empty logits, different devices, a NaN or
            infinite hyperparameter, a negative ``eps``.
    """
    if v.cpu_fast("aw_weights"):
        result = v.native.cpu_aw_weights(dots, real_logits, fake_logits, normalized, alpha1,
                                         alpha2, delta, eps)
        if result is not None:  # design §8.1: checked and run in C++
            return result
    v.tensor("dots", dots)
    v.shape("dots", dots, (3,))
    device = dots.device
    for name, t in (("real_logits", real_logits), ("fake_logits", fake_logits)):
        if not (isinstance(t, Tensor) and t.dtype in v.FLOATING and t.device == device):
            v.tensor(name, t)
            v.same_device(device, **{name: t})
        if t.numel() == 0:
            raise ValueError(f"{name} must not be empty (its sigmoid mean decides the case)")
    v.flag("normalized", normalized)
    acc = v.acc_dtype(dots.dtype)
    hyper = [v.finite(n, x, dtype=acc)
             for n, x in (("alpha1", alpha1), ("alpha2", alpha2), ("delta", delta))]
    hyper.append(v.finite("eps", eps, minimum=0.0, dtype=acc))
    if _dispatch.eager(dots, (real_logits, fake_logits)):  # design §8.1: no custom-op hop
        return _dispatch.route("aw_weights", device)(
            dots, real_logits, fake_logits, normalized, *hyper)
    return _aw_weights_op(dots, real_logits, fake_logits, normalized, *hyper)


def aw_combine_(
    out: Sequence[Tensor],
    g_r: Sequence[Tensor],
    g_f: Sequence[Tensor],
    w_r: float | Tensor,
    w_f: float | Tensor,
) -> None:
    """``out[p] = w_r * g_r[p] + w_f * g_f[p]`` in place, for every p.

    Args:
        out: list of tensors written in place (typically the parameters' ``.grad``); it may be
            ``g_r`` or ``g_f`` itself.
        g_r, g_f: lists shaped like ``out`` position by position; one floating dtype and one
            device for all three lists.
        w_r, w_f: Python numbers or 0-d floating tensors on that device (e.g. from
            :func:`aw_weights`; never read on the host).

    Math in float32 (float64 for float64 inputs), one rounding per element.

    Autograd: ``out`` is overwritten, not differentiated, so (as PyTorch's out= functions) an
    ``out`` tensor that requires grad is refused outside ``torch.no_grad()``, a parameter
    included (pass ``p.grad``, not ``p``); under ``no_grad`` it is written.

    Raises:
        TypeError / ValueError as :func:`multi_dot`; ValueError for an ``out`` tensor with
        overlapping memory, two ``out`` tensors sharing memory, a weight that is not 0-d;
        RuntimeError for an ``out`` tensor that requires grad (or a view of one) outside
        ``torch.no_grad()``. Nothing is written when it raises.
    """
    if (isinstance(w_r, Tensor) and isinstance(w_f, Tensor) and v.cpu_fast("aw_combine_")
            and v.native.cpu_aw_combine_(out, g_r, g_f, w_r, w_f)):  # design §8.1: ran in C++
        return
    if v.common_lists((out, g_r, g_f), written=1):  # design §8.1: one C++ pass
        device, acc = out[0].device, v.acc_dtype(out[0].dtype)
        w_r = v.scalar("w_r", w_r, device, acc)
        w_f = v.scalar("w_f", w_f, device, acc)
        if not (torch.is_grad_enabled() and (w_r.requires_grad or w_f.requires_grad)):
            _dispatch.route("aw_combine_", device)(out, g_r, g_f, w_r, w_f)
            increment_version(out)
            return
    (out, g_r, g_f), device, dtype = v.paired_lists(("out", "g_r", "g_f"), (out, g_r, g_f))
    for i, t in enumerate(out):
        v.no_internal_overlap(f"out[{i}]", t)
    v.inplace_list("out", out, out=True)
    acc = v.acc_dtype(dtype)
    w_r = v.scalar("w_r", w_r, device, acc)
    w_f = v.scalar("w_f", w_f, device, acc)
    v.disjoint_outputs("out", out)
    if _dispatch.eager(out[0], itertools.chain(out, g_r, g_f, (w_r, w_f))):  # design §8.1
        _dispatch.route("aw_combine_", device)(out, g_r, g_f, w_r, w_f)
        increment_version(out)
    else:
        _aw_combine_op(out, g_r, g_f, w_r, w_f)
