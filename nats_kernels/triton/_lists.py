"""The multi-tensor kernels shared by aw.py and iga.py:

* ``list_dots``: (<a,a>, <b,b>, <a,b>) over two lists -- per-chunk partial sums, then one small
  program that adds the partials in chunk order and writes the three sums (multi_dot) or the
  IGA ratio;
* ``combine``: out[p] = wa * a[p] + wb * b[p] (aw_combine_), or g[p] - r * gf[p]
  (iga_correction_).

Launch layout: see ``_common.plan`` and the docstring of ``nats_kernels.triton``.
"""

import torch
import triton
import triton.language as tl

from .._validate import acc_dtype
from ._common import (
    BLOCK,
    CHUNK,
    RBLOCK,
    SLOTS,
    acc_tl,
    finish,
    plan,
    safe_inputs,
)

# Per-slot sizes, starts and strides change from call to call; specializing on them (value 1,
# divisibility by 16) would compile a variant per combination.
_NO_SPEC = ["numels", "starts", "cols", "a_st", "b_st", "o_st", "part_base", "n_parts"]


@triton.jit(do_not_specialize=_NO_SPEC)
def _dots_partial_kernel(a_ptrs, b_ptrs, numels, starts, cols, a_st, b_st, part_ptr, part_base,
                         n_parts, K: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                         CONTIG: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    # The slot k whose programs hold this one: the last k with starts[k] <= pid (starts
    # increase; padding slots start at the grid size). Runtime ifs rather than selects: the
    # interpreter then skips the untaken assignments; the GPU runs a few scalar branches.
    a = a_ptrs[0]
    b = b_ptrs[0]
    n = tl.full([], numels[0], tl.int64)
    first = tl.full([], 0, tl.int64)
    c = tl.full([], cols[0], tl.int64)
    a_so = tl.full([], a_st[0], tl.int64)
    a_si = tl.full([], a_st[1], tl.int64)
    b_so = tl.full([], b_st[0], tl.int64)
    b_si = tl.full([], b_st[1], tl.int64)
    for k in tl.static_range(1, K):
        if pid >= starts[k]:
            a = a_ptrs[k]
            b = b_ptrs[k]
            n = tl.full([], numels[k], tl.int64)
            first = tl.full([], starts[k], tl.int64)
            if not CONTIG:
                c = tl.full([], cols[k], tl.int64)
                a_so = tl.full([], a_st[2 * k], tl.int64)
                a_si = tl.full([], a_st[2 * k + 1], tl.int64)
                b_so = tl.full([], b_st[2 * k], tl.int64)
                b_si = tl.full([], b_st[2 * k + 1], tl.int64)
    begin = (pid - first) * CHUNK
    end = tl.minimum(begin + CHUNK, n)
    aa = tl.full([BLOCK], 0, ACC)
    bb = tl.full([BLOCK], 0, ACC)
    ab = tl.full([BLOCK], 0, ACC)
    for s in range(begin, end, BLOCK):
        i = s + tl.arange(0, BLOCK)
        m = i < end
        if CONTIG:
            ao = i
            bo = i
        else:
            ao = (i // c) * a_so + (i % c) * a_si
            bo = (i // c) * b_so + (i % c) * b_si
        x = tl.load(a + ao, mask=m, other=0).to(ACC)
        y = tl.load(b + bo, mask=m, other=0).to(ACC)
        aa += x * x
        bb += y * y
        ab += x * y
    slot = part_base + pid
    tl.store(part_ptr + slot, tl.sum(aa, 0))
    tl.store(part_ptr + n_parts + slot, tl.sum(bb, 0))
    tl.store(part_ptr + 2 * n_parts + slot, tl.sum(ab, 0))


@triton.jit(do_not_specialize=["n_parts"])
def _dots_final_kernel(part_ptr, n_parts, out_ptr, eps: "fp64", RATIO: tl.constexpr,  # noqa: F821
                       RBLOCK: tl.constexpr, ACC: tl.constexpr):
    aa = tl.full([RBLOCK], 0, ACC)
    bb = tl.full([RBLOCK], 0, ACC)
    ab = tl.full([RBLOCK], 0, ACC)
    for s in range(0, n_parts, RBLOCK):
        j = s + tl.arange(0, RBLOCK)
        m = j < n_parts
        aa += tl.load(part_ptr + j, mask=m, other=0)
        bb += tl.load(part_ptr + n_parts + j, mask=m, other=0)
        ab += tl.load(part_ptr + 2 * n_parts + j, mask=m, other=0)
    sa = tl.sum(aa, 0)
    sab = tl.sum(ab, 0)
    if RATIO:
        tl.store(out_ptr, sab / (sa + tl.full([], eps, ACC)))
    else:
        tl.store(out_ptr, sa)
        tl.store(out_ptr + 1, tl.sum(bb, 0))
        tl.store(out_ptr + 2, sab)


def list_dots(a: list[torch.Tensor], b: list[torch.Tensor], eps: float | None) -> torch.Tensor:
    """(<a,a>, <b,b>, <a,b>) as a (3,) tensor, or <a,b> / (<a,a> + eps) as a 0-d tensor when
    ``eps`` is given; in float32 (float64 for float64 inputs), on the inputs' device."""
    acc = acc_dtype(a[0].dtype)
    device = a[0].device
    p = plan([a, b], writes=False)
    # One slot per chunk and sum; at least one element so that the pointer is a real allocation.
    part = torch.empty(3 * max(p.chunks, 1), dtype=acc, device=device)
    for g in p.groups:
        _dots_partial_kernel[(g.chunks,)](
            g.ptrs[0], g.ptrs[1], g.numels, g.starts, g.cols, g.strides[0], g.strides[1],
            part, g.base, p.chunks, K=SLOTS, CHUNK=CHUNK, BLOCK=BLOCK, CONTIG=g.contiguous,
            ACC=acc_tl(a[0].dtype),
        )
    ratio = eps is not None
    out = torch.empty(() if ratio else (3,), dtype=acc, device=device)
    _dots_final_kernel[(1,)](part, p.chunks, out, float(eps) if ratio else 0.0, RATIO=ratio,
                             RBLOCK=RBLOCK, ACC=acc_tl(a[0].dtype))
    return out


@triton.jit(do_not_specialize=_NO_SPEC)
def _combine_kernel(o_ptrs, a_ptrs, b_ptrs, wa_ptr, wb_ptr, numels, starts, cols, o_st, a_st,
                    b_st, K: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                    CONTIG: tl.constexpr, IGA: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    # The slot of this program, as in _dots_partial_kernel (repeated on purpose, like the chunk
    # loop below: the kernels call no device function of their own, see _common's docstring).
    o = o_ptrs[0]
    a = a_ptrs[0]
    b = b_ptrs[0]
    n = tl.full([], numels[0], tl.int64)
    first = tl.full([], 0, tl.int64)
    c = tl.full([], cols[0], tl.int64)
    o_so = tl.full([], o_st[0], tl.int64)
    o_si = tl.full([], o_st[1], tl.int64)
    a_so = tl.full([], a_st[0], tl.int64)
    a_si = tl.full([], a_st[1], tl.int64)
    b_so = tl.full([], b_st[0], tl.int64)
    b_si = tl.full([], b_st[1], tl.int64)
    for k in tl.static_range(1, K):
        if pid >= starts[k]:
            o = o_ptrs[k]
            a = a_ptrs[k]
            b = b_ptrs[k]
            n = tl.full([], numels[k], tl.int64)
            first = tl.full([], starts[k], tl.int64)
            if not CONTIG:
                c = tl.full([], cols[k], tl.int64)
                o_so = tl.full([], o_st[2 * k], tl.int64)
                o_si = tl.full([], o_st[2 * k + 1], tl.int64)
                a_so = tl.full([], a_st[2 * k], tl.int64)
                a_si = tl.full([], a_st[2 * k + 1], tl.int64)
                b_so = tl.full([], b_st[2 * k], tl.int64)
                b_si = tl.full([], b_st[2 * k + 1], tl.int64)
    begin = (pid - first) * CHUNK
    end = tl.minimum(begin + CHUNK, n)
    wa = tl.load(wa_ptr).to(ACC)
    wb = tl.load(wb_ptr).to(ACC)
    for s in range(begin, end, BLOCK):
        i = s + tl.arange(0, BLOCK)
        m = i < end
        if CONTIG:
            oo = i
            ao = i
            bo = i
        else:
            oo = (i // c) * o_so + (i % c) * o_si
            ao = (i // c) * a_so + (i % c) * a_si
            bo = (i // c) * b_so + (i % c) * b_si
        x = tl.load(a + ao, mask=m).to(ACC)
        y = tl.load(b + bo, mask=m).to(ACC)
        if IGA:  # the reference's x - r * y (wa unused)
            r = x - wb * y
        else:
            r = wa * x + wb * y
        tl.store(o + oo, r.to(o.dtype.element_ty), mask=m)


def combine(out: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor],
            wa: torch.Tensor, wb: torch.Tensor, iga: bool) -> None:
    """out[p] = wa * a[p] + wb * b[p] (``iga``: out[p] = a[p] - wb * b[p]) in place, with the
    0-d device weights converted to the accumulation dtype in the kernel. ``out[p]`` may be
    ``a[p]`` or ``b[p]`` itself; any other overlap of an input with an output reads a private
    copy of that input."""
    a = safe_inputs(out, a)
    b = safe_inputs(out, b)
    p = plan([list(out), a, b], writes=True)
    for g in p.groups:
        _combine_kernel[(g.chunks,)](
            g.ptrs[0], g.ptrs[1], g.ptrs[2], wa, wb, g.numels, g.starts, g.cols, g.strides[0],
            g.strides[1], g.strides[2], K=SLOTS, CHUNK=CHUNK, BLOCK=BLOCK,
            CONTIG=g.contiguous, IGA=iga, ACC=acc_tl(out[0].dtype),
        )
    finish(p)
