"""Shared pieces of the Triton backend: constants, memory layouts, aliasing checks, the
multi-tensor launch plan and the small ``@triton.jit`` helpers the kernels share.

Everything on the host side here reads tensor metadata only (shapes, strides, data pointers,
storages): no device value is ever read back.

The kernels call no ``@triton.jit`` function of their own and fill with ``tl.full`` rather than
``tl.zeros``: under TRITON_INTERPRET=1 each call of a device function re-patches
``triton.language`` (a fraction of a millisecond to 2 ms), which made the interpreted test suite
several times slower. The few lines the kernels share (slot selection, 2-d offsets, the loop of
a chunk) are therefore repeated, deliberately, in each kernel. The exception is the public
``tl.sum`` / ``tl.cumsum`` (one device-function call per program): the only public spelling of
the sum that the interpreter runs as numpy's ``sum`` / ``cumsum`` (a combine function of our own
would run element by element, in another order); compiled, it is the same reduction.

Float scalar arguments that must keep float64 precision (eta, eps, the aw hyperparameters) are
annotated ``"fp64"``: Triton types an unannotated Python float as float32. Triton reads the
annotation from the source text, so it is the literal string (ruff: ``noqa: F821``) and the
kernel modules do not use ``from __future__ import annotations``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from .._validate import acc_dtype

# Elements per vector step of a program.
BLOCK = 1024
# Elements per program of the multi-tensor kernels. Fixed, never derived from the device: the
# partial sums of the reductions, hence their bits, depend on it.
CHUNK = 8192
# Tensors per launch of the multi-tensor kernels (the K of the docstring of __init__.py).
SLOTS = 16
# Vector width of the final, single-program reductions over the per-chunk partial sums.
RBLOCK = 1024



def acc_tl(dtype: torch.dtype):
    """The accumulation type (design §9.1, ``_validate.acc_dtype``) as a Triton type."""
    return {torch.float64: tl.float64, torch.float32: tl.float32}[acc_dtype(dtype)]


# --------------------------------------------------------------------------------- layouts


@dataclass
class Layout:
    """The joint layout of same-shaped tensors as a 2-d logical array of rows of ``cols``
    elements: logical element ``i`` of operand ``k`` lives at
    ``(i // cols) * strides[k][0] + (i % cols) * strides[k][1]`` elements from its data pointer.
    ``contiguous`` means one dim with unit stride in every operand (offset = i)."""

    cols: int
    strides: list[tuple[int, int]]
    contiguous: bool


def layout2d(tensors: list[torch.Tensor]) -> Layout | None:
    """Drop size-1 dims, merge dims that are contiguous with their inner neighbour in every
    operand (as csrc/cpu/nk_cpu_utils.h make_layout), and return the result if it has at most two
    dims; None otherwise (e.g. a permuted 3-d view, an expanded middle dim)."""
    shape = tensors[0].shape
    dims = [d for d in range(len(shape)) if shape[d] != 1]
    if not dims:  # one element
        return Layout(1, [(0, 1)] * len(tensors), True)
    sizes = [shape[d] for d in dims]
    strides = [[t.stride(d) for d in dims] for t in tensors]
    msizes = [sizes[-1]]
    mstrides = [[s[-1]] for s in strides]
    for j in range(len(sizes) - 2, -1, -1):
        if all(s[j] == ms[-1] * msizes[-1] for s, ms in zip(strides, mstrides)):
            msizes[-1] *= sizes[j]
        else:
            if len(msizes) == 2:
                return None
            msizes.append(sizes[j])
            for s, ms in zip(strides, mstrides):
                ms.append(s[j])
    if len(msizes) == 1:
        inner = [ms[0] for ms in mstrides]
        return Layout(msizes[0], [(0, si) for si in inner], all(si == 1 for si in inner))
    return Layout(msizes[0], [(ms[1], ms[0]) for ms in mstrides], False)


# -------------------------------------------------------------------------------- aliasing


def _span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range [lo, hi) spanned by a non-empty tensor's elements."""
    lo = hi = 0
    for n, s in zip(t.shape, t.stride()):
        ext = (n - 1) * s
        if ext < 0:
            lo += ext
        else:
            hi += ext
    base, item = t.data_ptr(), t.element_size()
    return base + lo * item, base + (hi + 1) * item


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride())


def overlap_hazard(out: torch.Tensor, inp: torch.Tensor) -> bool:
    """True when an elementwise kernel writing ``out`` while reading ``inp`` at the same logical
    index could read an element it already overwrote: the memory overlaps and the two are not
    the very same view (the one harmless overlap)."""
    if out.numel() == 0 or inp.numel() == 0 or _storage(out) != _storage(inp):
        return False
    if same_view(out, inp):
        return False
    olo, ohi = _span(out)
    ilo, ihi = _span(inp)
    return olo < ihi and ilo < ohi


def safe_inputs(out: list[torch.Tensor], inp: list[torch.Tensor]) -> list[torch.Tensor]:
    """``inp`` with a private copy of each tensor that a kernel writing ``out`` (all positions in
    parallel) could overwrite before reading it: any overlap with ``out[p]``, p != q, or a
    non-identical overlap with ``out[q]``. Spans are sorted per storage: O(P log P)."""
    by_storage: dict[int, list[tuple[int, int, int]]] = {}
    for p, o in enumerate(out):
        if o.numel():
            by_storage.setdefault(_storage(o), []).append((*_span(o), p))
    if not by_storage:
        return list(inp)
    index = {}
    for key, spans in by_storage.items():
        spans.sort()
        run, max_hi = 0, []
        for _, hi, _ in spans:
            run = max(run, hi)
            max_hi.append(run)
        index[key] = (spans, [s[0] for s in spans], max_hi)
    res = list(inp)
    for q, t in enumerate(inp):
        if not t.numel() or _storage(t) not in index:
            continue
        spans, los, max_hi = index[_storage(t)]
        lo, hi = _span(t)
        k = bisect.bisect_left(los, hi)  # spans starting before hi
        while k > 0 and max_hi[k - 1] > lo:
            k -= 1
            s_lo, s_hi, p = spans[k]
            if s_hi > lo and (p != q or not same_view(out[p], t)):
                res[q] = t.clone()
                break
    return res


# ------------------------------------------------------------------------ multi-tensor plan


@dataclass
class Group:
    """One launch of a multi-tensor kernel: up to SLOTS positions, padded to SLOTS."""

    ptrs: list[tuple]           # per operand: SLOTS tensors (padding repeats the first)
    numels: tuple
    starts: tuple               # first program of each slot; padding slots start at `chunks`
    cols: tuple
    strides: list[tuple]        # per operand: 2 * SLOTS ints (row stride, element stride)
    chunks: int                 # programs of this launch
    base: int                   # index of this launch's first chunk among all launches
    contiguous: bool


@dataclass
class Plan:
    groups: list[Group] = field(default_factory=list)
    chunks: int = 0
    # (destination, computed) pairs to copy after the launches (outputs laid out > 2-d).
    writeback: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def plan(lists: list[list[torch.Tensor]], writes: bool) -> Plan:
    """Cut positions p (tensors ``lists[k][p]``, one shape per p) into launches of up to SLOTS
    tensors, each tensor into CHUNK-element programs; empty tensors get none. ``lists[0]`` is
    written when ``writes``. A position whose joint layout has more than two dims reads
    contiguous copies of its inputs (and, if the output itself is such a view, computes into a
    contiguous tensor copied back afterwards, see ``Plan.writeback``).

    Positions are ordered contiguous first, then strided, each in list order, so that most
    launches take the contiguous fast path; the order (hence the reduction order) depends on
    shapes and strides only."""
    result = Plan()
    entries = []
    for p in range(len(lists[0])):
        ops = [lst[p] for lst in lists]
        if ops[0].numel() == 0:
            continue
        lay = layout2d(ops)
        if lay is None:
            first = 1 if writes else 0
            ops = ops[:first] + [t.contiguous() for t in ops[first:]]
            lay = layout2d(ops)
            if lay is None:  # only the output remains a > 2-d view
                tmp = torch.empty(ops[0].shape, dtype=ops[0].dtype, device=ops[0].device)
                result.writeback.append((ops[0], tmp))
                ops[0] = tmp
                lay = layout2d(ops)
        entries.append((ops, lay))
    entries.sort(key=lambda e: not e[1].contiguous)  # stable
    nops = len(lists)
    for g in range(0, len(entries), SLOTS):
        part = entries[g:g + SLOTS]
        pad = SLOTS - len(part)
        starts, numels, cols, chunks = [], [], [], 0
        for ops, lay in part:
            starts.append(chunks)
            numels.append(ops[0].numel())
            cols.append(lay.cols)
            chunks += triton.cdiv(ops[0].numel(), CHUNK)
        ptrs = [tuple(e[0][k] for e in part) + (part[0][0][k],) * pad for k in range(nops)]
        strides = [tuple(x for e in part for x in e[1].strides[k]) + (0, 1) * pad
                   for k in range(nops)]
        result.groups.append(Group(
            ptrs=ptrs,
            numels=tuple(numels) + (0,) * pad,
            starts=tuple(starts) + (chunks,) * pad,
            cols=tuple(cols) + (1,) * pad,
            strides=strides,
            chunks=chunks,
            base=result.chunks,
            contiguous=all(e[1].contiguous for e in part),
        ))
        result.chunks += chunks
    return result


def finish(p: Plan) -> None:
    for dst, tmp in p.writeback:
        dst.copy_(tmp)
