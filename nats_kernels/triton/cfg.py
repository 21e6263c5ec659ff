"""Triton kernels of design §1: cfg_accumulate (stacked and list forms) and cfg_step_.

    out = x0 + sum_m c[m, row] * grads[m]
    c[m, row] = (acc(weights[m]) * acc(eta)) * acc(scale[m, row])

One pass over memory: each program loads a block of x0 into float32 (float64 for float64)
registers, adds every gradient's block with its per-sample factor, and writes ``out`` once.
Same signatures and semantics as nats_kernels/reference/cfg.py; arguments arrive validated.
"""

import torch
import triton
import triton.language as tl

from .._dispatch import register
from .._validate import acc_dtype
from ._common import BLOCK, acc_tl, layout2d, overlap_hazard

# Gradients of the list form read by one launch (the tuple is unrolled in the kernel). More
# steps than this run in passes of up to MAX_LIST gradients through a float32/float64 scratch
# tensor: the same additions in the same order, so still one rounding at the end.
MAX_LIST = 16

_NO_SPEC = ["numel", "row_size", "M", "m0", "g_sm", "w_st", "s_sm", "s_sb", "cols", "o_so", "o_si",
            "x_so", "x_si", "g_so", "g_si", "g_st"]


@triton.jit(do_not_specialize=_NO_SPEC)
def _cfg_stacked_kernel(out_ptr, x_ptr, g_ptr, w_ptr, s_ptr, eta: "fp64", numel, row_size, M,  # noqa: F821
                        g_sm, w_st, s_sm, s_sb, cols, o_so, o_si, x_so, x_si, g_so, g_si,
                        HAS_SCALE: tl.constexpr, CONTIG: tl.constexpr, BLOCK: tl.constexpr,
                        ACC: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    row = i // row_size
    eta_acc = tl.full([], eta, ACC)
    if CONTIG:
        oo = i
        xo = i
        go = i
    else:
        oo = (i // cols) * o_so + (i % cols) * o_si
        xo = (i // cols) * x_so + (i % cols) * x_si
        go = (i // cols) * g_so + (i % cols) * g_si
    total = tl.load(x_ptr + xo, mask=mask).to(ACC)
    g_m = g_ptr  # advanced by g_sm per step: 64-bit pointer arithmetic, no index overflow
    for m in range(0, M):
        # (acc(weights[m]) * eta) * acc(scale[m, row]): the reference's order of operations.
        c = tl.load(w_ptr + m * w_st).to(ACC) * eta_acc
        if HAS_SCALE:
            c = c * tl.load(s_ptr + m * s_sm + row * s_sb, mask=mask, other=0).to(ACC)
        total = total + c * tl.load(g_m + go, mask=mask).to(ACC)
        g_m += g_sm
    tl.store(out_ptr + oo, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_NO_SPEC)
def _cfg_list_kernel(out_ptr, x_ptr, g_ptrs, w_ptr, s_ptr, eta: "fp64", numel, row_size, m0,  # noqa: F821
                     w_st, s_sm, s_sb, cols, o_so, o_si, x_so, x_si, g_st,
                     NG: tl.constexpr, HAS_SCALE: tl.constexpr, CONTIG: tl.constexpr,
                     BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Steps m0 .. m0 + NG - 1, gradients g_ptrs[k] with strides g_st[2k], g_st[2k + 1]. Its
    prologue repeats _cfg_stacked_kernel's on purpose: no device function (see _common)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    row = i // row_size
    eta_acc = tl.full([], eta, ACC)
    if CONTIG:
        oo = i
        xo = i
    else:
        oo = (i // cols) * o_so + (i % cols) * o_si
        xo = (i // cols) * x_so + (i % cols) * x_si
    total = tl.load(x_ptr + xo, mask=mask).to(ACC)
    for k in tl.static_range(NG):
        c = tl.load(w_ptr + (m0 + k) * w_st).to(ACC) * eta_acc
        if HAS_SCALE:
            c = c * tl.load(s_ptr + (m0 + k) * s_sm + row * s_sb, mask=mask, other=0).to(ACC)
        if CONTIG:
            go = i
        else:
            go = (i // cols) * g_st[2 * k] + (i % cols) * g_st[2 * k + 1]
        total = total + c * tl.load(g_ptrs[k] + go, mask=mask).to(ACC)
    tl.store(out_ptr + oo, total.to(out_ptr.dtype.element_ty), mask=mask)


def _target(out, inputs):
    """Where to write: ``out`` itself, or a contiguous scratch copied into ``out`` afterwards
    when ``out`` overlaps an input other than by being the very same view."""
    if any(overlap_hazard(out, t) for t in inputs):
        return torch.empty(out.shape, dtype=out.dtype, device=out.device)
    return out


def _run(x0, grads, stacked, weights, eta, scale, out):
    """out = x0 + sum_m eta * weights[m] * scale[m] * grads[m]; ``grads`` a (M, ...) tensor when
    ``stacked``, else a list; ``scale`` None or (M, B)."""
    numel = x0.numel()
    if numel == 0:
        return
    views = [grads[0]] if stacked else list(grads)
    target = _target(out, [x0, *views])
    if layout2d([target, x0, *views]) is None:
        # A view laid out in more than two dims: read contiguous copies of the inputs, and write
        # a contiguous scratch if the output is such a view.
        x0 = x0.contiguous()
        grads = grads.contiguous() if stacked else [g.contiguous() for g in grads]
        views = [grads[0]] if stacked else list(grads)
        if layout2d([target]) is None:
            target = torch.empty(out.shape, dtype=out.dtype, device=out.device)
    has_scale = scale is not None
    row_size = numel // x0.shape[0] if has_scale else numel
    s, s_sm, s_sb = (scale, scale.stride(0), scale.stride(1)) if has_scale else (weights, 0, 0)
    acc = acc_tl(x0.dtype)
    grid = (triton.cdiv(numel, BLOCK),)
    if stacked:
        lay = layout2d([target, x0, views[0]])
        (o_so, o_si), (x_so, x_si), (g_so, g_si) = lay.strides
        _cfg_stacked_kernel[grid](
            target, x0, grads, weights, s, eta, numel, row_size, grads.shape[0], grads.stride(0),
            weights.stride(0), s_sm, s_sb, lay.cols, o_so, o_si, x_so, x_si, g_so, g_si,
            HAS_SCALE=has_scale, CONTIG=lay.contiguous, BLOCK=BLOCK, ACC=acc,
        )
    else:
        src = x0
        for m0 in range(0, len(grads), MAX_LIST):
            part = grads[m0:m0 + MAX_LIST]
            last = m0 + MAX_LIST >= len(grads)
            dst = target if last else torch.empty(x0.shape, dtype=acc_dtype(x0.dtype),
                                                  device=x0.device)
            # Adding a contiguous scratch to operands laid out in <= 2 dims keeps them so.
            lay = layout2d([dst, src, *part])
            (d_so, d_si), (s_so, s_si) = lay.strides[:2]
            g_st = tuple(x for st in lay.strides[2:] for x in st)
            _cfg_list_kernel[grid](
                dst, src, tuple(part), weights, s, eta, numel, row_size, m0, weights.stride(0),
                s_sm, s_sb, lay.cols, d_so, d_si, s_so, s_si, g_st, NG=len(part),
                HAS_SCALE=has_scale, CONTIG=lay.contiguous, BLOCK=BLOCK, ACC=acc,
            )
            src = dst
    if target is not out:
        out.copy_(target)


@register("triton", "cfg_accumulate")
def cfg_accumulate(x0, grads, weights, eta, scale, out) -> None:
    _run(x0, grads, True, weights, eta, scale, out)


@register("triton", "cfg_accumulate_list")
def cfg_accumulate_list(x0, grads, weights, eta, scale, out) -> None:
    _run(x0, list(grads), False, weights, eta, scale, out)


@register("triton", "cfg_step_")
def cfg_step_(x, grad, weight, eta, scale) -> None:
    """x += eta * weight * scale * grad, in place (the stacked kernel with M = 1, out = x0 = x)."""
    _run(x, grad.unsqueeze(0), True, weight.reshape(1),
         eta, None if scale is None else scale.reshape(1, -1), x)
