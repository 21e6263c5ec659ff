"""Triton kernels of design §4 (aw-loss): multi_dot, aw_weights, aw_combine_.

Same signatures and semantics as nats_kernels/reference/aw.py; arguments arrive validated.
"""

import torch
import triton
import triton.language as tl

from .._dispatch import register
from ..reference.aw import NORM_EPS
from ._common import BLOCK, CHUNK, RBLOCK, acc_tl, layout2d
from ._lists import combine, list_dots


@register("triton", "multi_dot")
def multi_dot(a, b):
    """(<a,a>, <b,b>, <a,b>) as a new (3,) tensor in float32 (float64 for float64 inputs)."""
    return list_dots(a, b, None)


@register("triton", "aw_combine_")
def aw_combine_(out, g_r, g_f, w_r, w_f) -> None:
    """out[p] = w_r * g_r[p] + w_f * g_f[p], in place; out may be g_r or g_f themselves."""
    combine(out, g_r, g_f, w_r, w_f, iga=False)


@triton.jit(do_not_specialize=["r_n", "r_c", "r_so", "r_si", "f_n", "f_c", "f_so", "f_si",
                               "r_chunks"])
def _sigmoid_partial_kernel(r_ptr, r_n, r_c, r_so, r_si, f_ptr, f_n, f_c, f_so, f_si, r_chunks,
                            part_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                            R_CONTIG: tl.constexpr, F_CONTIG: tl.constexpr,
                            R_ACC: tl.constexpr, F_ACC: tl.constexpr):
    """Programs [0, r_chunks) sum sigmoid over CHUNK-element pieces of the real logits, the rest
    over the fake logits; each writes its float64 partial into its own slot."""
    pid = tl.program_id(0)
    if pid < r_chunks:
        begin = pid.to(tl.int64) * CHUNK
        end = tl.minimum(begin + CHUNK, r_n)
        total = tl.full([BLOCK], 0, R_ACC)
        for s in range(begin, end, BLOCK):
            i = s + tl.arange(0, BLOCK)
            m = i < end
            if R_CONTIG:
                off = i
            else:
                off = (i // r_c) * r_so + (i % r_c) * r_si
            x = tl.load(r_ptr + off, mask=m, other=0).to(R_ACC)
            total += tl.where(m, 1.0 / (1.0 + tl.exp(-x)), 0.0)
        tl.store(part_ptr + pid, tl.sum(total, 0).to(tl.float64))
    else:  # own names: a variable set in both branches must have one type (R_ACC != F_ACC)
        # The real branch's loop again, on purpose: no device function (see _common).
        f_begin = (pid - r_chunks).to(tl.int64) * CHUNK
        f_end = tl.minimum(f_begin + CHUNK, f_n)
        f_total = tl.full([BLOCK], 0, F_ACC)
        for f_s in range(f_begin, f_end, BLOCK):
            f_i = f_s + tl.arange(0, BLOCK)
            f_m = f_i < f_end
            if F_CONTIG:
                f_off = f_i
            else:
                f_off = (f_i // f_c) * f_so + (f_i % f_c) * f_si
            f_x = tl.load(f_ptr + f_off, mask=f_m, other=0).to(F_ACC)
            f_total += tl.where(f_m, 1.0 / (1.0 + tl.exp(-f_x)), 0.0)
        tl.store(part_ptr + pid, tl.sum(f_total, 0).to(tl.float64))


@triton.jit(do_not_specialize=["r_chunks", "n_chunks", "d_stride"])
def _aw_rule_kernel(part_ptr, r_chunks, n_chunks, r_count: "fp64", f_count: "fp64", d_ptr,  # noqa: F821
                    d_stride, w_r_ptr, w_f_ptr, case_ptr, alpha1: "fp64", alpha2: "fp64",  # noqa: F821
                    delta: "fp64", eps: "fp64", norm_eps: "fp64", NORMALIZED: tl.constexpr,  # noqa: F821
                    R_ACC: tl.constexpr, F_ACC: tl.constexpr, T: tl.constexpr,
                    RBLOCK: tl.constexpr):
    """design §4's table as the reference's tree of selects: comparisons with NaN are false, and a
    branch that is not selected never contaminates the result."""
    # The means: partials added in chunk order (float64), divided by the count, rounded to the
    # logits' accumulation dtype (the reference's mean), then to the rule's math type T.
    sum_r = tl.full([RBLOCK], 0, tl.float64)
    for s in range(0, r_chunks, RBLOCK):
        j = s + tl.arange(0, RBLOCK)
        sum_r += tl.load(part_ptr + j, mask=j < r_chunks, other=0)
    sum_f = tl.full([RBLOCK], 0, tl.float64)
    for s in range(r_chunks, n_chunks, RBLOCK):
        j = s + tl.arange(0, RBLOCK)
        sum_f += tl.load(part_ptr + j, mask=j < n_chunks, other=0)
    s_r = (tl.sum(sum_r, 0) / tl.full([], r_count, tl.float64)).to(R_ACC).to(T)
    s_f = (tl.sum(sum_f, 0) / tl.full([], f_count, tl.float64)).to(F_ACC).to(T)
    rr = tl.load(d_ptr).to(T) + tl.full([], norm_eps, T)
    ff = tl.load(d_ptr + d_stride).to(T) + tl.full([], norm_eps, T)
    rf = tl.load(d_ptr + 2 * d_stride).to(T)
    one = tl.full([], 1.0, T)
    zero = tl.full([], 0.0, T)
    if NORMALIZED:
        inv_r = one / tl.sqrt(rr)
        inv_f = one / tl.sqrt(ff)
    else:
        inv_r = one
        inv_f = one
    sf_delta = s_f - tl.full([], delta, T)
    real_weak = (s_r < tl.full([], alpha1, T)) | (s_r < sf_delta)
    real_strong = (s_r > tl.full([], alpha2, T)) & (s_r > sf_delta)
    # Not (rf > 0): a NaN rf fails `rf <= 0` and takes the rf > 0 column, as in the official code.
    aligned = ~(rf <= zero)
    case = tl.where(real_weak, tl.where(aligned, 2, 1),
                    tl.where(real_strong, tl.where(aligned, 4, 3), 5))
    w_r = tl.where(real_weak | ~real_strong, inv_r,
                   tl.where(aligned, zero, -rf / rr * inv_f)) + tl.full([], eps, T)
    w_f = tl.where(real_weak, tl.where(aligned, zero, -rf / ff * inv_r), inv_f) + tl.full(
        [], eps, T)
    tl.store(w_r_ptr, w_r.to(w_r_ptr.dtype.element_ty))
    tl.store(w_f_ptr, w_f.to(w_f_ptr.dtype.element_ty))
    tl.store(case_ptr, case.to(tl.int64))


def _logits_args(x: torch.Tensor):
    """(tensor, numel, cols, row stride, element stride, contiguous) of a read-only operand;
    a view laid out in more than two dims is read from a contiguous copy."""
    lay = layout2d([x])
    if lay is None:
        x = x.contiguous()
        lay = layout2d([x])
    (so, si), = lay.strides
    return x, x.numel(), lay.cols, so, si, lay.contiguous


@register("triton", "aw_weights")
def aw_weights(dots, real_logits, fake_logits, normalized, alpha1, alpha2, delta, eps):
    """(w_r, w_f, case): 0-d device tensors, weights in dots' dtype, case int64. Two launches:
    per-chunk sigmoid sums of both logits, then one program for the means and the rule.

    Math type of the rule: float64 for float64 dots, else float32, as the reference and the C++
    kernels; the weights are rounded to dots' dtype once, at the end. The means follow the
    reference: sigmoid and sum in float32 (float64 for float64 logits), the mean rounded to that
    dtype, then to the math type."""
    r, r_n, r_c, r_so, r_si, r_contig = _logits_args(real_logits)
    f, f_n, f_c, f_so, f_si, f_contig = _logits_args(fake_logits)
    r_chunks = triton.cdiv(r_n, CHUNK)
    n_chunks = r_chunks + triton.cdiv(f_n, CHUNK)
    part = torch.empty(n_chunks, dtype=torch.float64, device=dots.device)
    _sigmoid_partial_kernel[(n_chunks,)](
        r, r_n, r_c, r_so, r_si, f, f_n, f_c, f_so, f_si, r_chunks, part, CHUNK=CHUNK,
        BLOCK=BLOCK, R_CONTIG=r_contig, F_CONTIG=f_contig, R_ACC=acc_tl(r.dtype),
        F_ACC=acc_tl(f.dtype),
    )
    w_r = torch.empty((), dtype=dots.dtype, device=dots.device)
    w_f = torch.empty((), dtype=dots.dtype, device=dots.device)
    case = torch.empty((), dtype=torch.int64, device=dots.device)
    _aw_rule_kernel[(1,)](
        part, r_chunks, n_chunks, float(r_n), float(f_n), dots, dots.stride(0), w_r, w_f, case,
        alpha1, alpha2, delta, eps, NORM_EPS, NORMALIZED=normalized, R_ACC=acc_tl(r.dtype),
        F_ACC=acc_tl(f.dtype), T=acc_tl(dots.dtype), RBLOCK=RBLOCK,
    )
    return w_r, w_f, case
