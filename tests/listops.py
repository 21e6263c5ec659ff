"""Helpers shared by the multi-tensor op tests (test_multi_dot.py, test_aw_*.py, test_iga*.py,
test_aliasing.py): the shape lists, tensor lists in several memory layouts, snapshots and the
comparison of what must stay unchanged, the bad-input operands."""

from __future__ import annotations

import torch
from helpers import AWKWARD, make

LAYOUTS = ("contiguous", "strided", "transposed", "mixed")

# Lists of shapes: awkward sizes, 0-d and zero-size tensors mixed in, one huge-ish tensor among
# many tiny ones, single-element lists, lists of empty tensors only.
SHAPE_LISTS = {
    "awkward": [(n,) for n in AWKWARD] + [(7, 59), (97, 1, 7), (3, 1025)],
    "0d-and-empty": [(), (0,), (59,), (3, 0, 7), (), (1,), (7, 97), (0, 5)],
    # 42025 elements: more than one CPU grain (32768) and dozens of GPU blocks.
    "huge-among-tiny": [(), (1,), (7,), (0,), (59,)] * 6 + [(1025, 41)] + [(1, 1), (), (7,)] * 6,
    "single": [(97, 59)],
    "single-0d": [()],
    "only-empty": [(0,), (3, 0)],
}


def zeros(*shape, dtype=torch.float32):
    """A CPU tensor of zeros: the operands of the bad-input tables."""
    return torch.zeros(shape, dtype=dtype)


def value(w) -> float:
    """A weight as the op sees it: a Python number, or the (rounded) value of a 0-d tensor."""
    return float(w.double()) if isinstance(w, torch.Tensor) else float(w)


def tensor_like(shape, dtype, device, seed, layout, scale=1.0):
    """A tensor of ``shape``: contiguous, strided (every other element of a wider buffer), or a
    transposed view (1-d and 0-d shapes fall back to strided)."""
    shape = tuple(shape)
    if layout == "transposed" and len(shape) >= 2:
        base = make(shape[:-2] + (shape[-1], shape[-2]), dtype, device, seed=seed, scale=scale)
        t = base.transpose(-1, -2)
        assert t.shape == shape
        return t
    return make(shape, dtype, device, seed=seed, noncontiguous=layout != "contiguous", scale=scale)


def tensor_list(shapes, dtype, device, seed, layout, which=0, scale=1.0):
    """A list of tensors; ``layout="mixed"`` cycles the layouts by position and by list."""
    plain = ("contiguous", "strided", "transposed")
    return [
        tensor_like(
            s, dtype, device, seed * 1000 + p,
            plain[(p + which) % 3] if layout == "mixed" else layout, scale,
        )
        for p, s in enumerate(shapes)
    ]


def huge_among_tiny(dtype, device, seeds, which):
    """One list of ``SHAPE_LISTS["huge-among-tiny"]`` in mixed layouts per seed (and ``which``):
    the lists of the ``*_threaded`` tests, where the huge tensor is larger than one parallel
    grain."""
    return [tensor_list(SHAPE_LISTS["huge-among-tiny"], dtype, device, seed=s, layout="mixed",
                        which=w) for s, w in zip(seeds, which)]


def strided_views(shapes, dtype, device, seed):
    """Tensors to be written, as every other element of wider buffers, so that writes outside the
    views would show in the buffers. Returns (views, buffers)."""
    bufs = [make(tuple(s[:-1]) + (2 * s[-1],) if s else (2,), dtype, device, seed=seed + p)
            for p, s in enumerate(shapes)]
    return [b[..., ::2] if s else b[0] for b, s in zip(bufs, shapes)], bufs


def assert_wrote_only_the_views(bufs, before, shapes, what):
    """The elements of ``strided_views``' buffers between the views are as they were."""
    for p, (b, b0) in enumerate(zip(bufs, before)):
        rest = (b[..., 1::2], b0[..., 1::2]) if shapes[p] else (b[1], b0[1])
        assert torch.equal(*rest), f"wrote outside {what}[{p}]"


def doubles(ts):
    return [t.double() for t in ts]


def snapshot(ts):
    return [t.clone() for t in ts]


def assert_unchanged(ts, before, what):
    """Bit for bit the same values (NaN where there was NaN)."""
    for p, (t, b) in enumerate(zip(ts, before)):
        same = (t == b) | (t.isnan() & b.isnan())
        assert t.dtype == b.dtype and t.shape == b.shape and same.all(), f"{what}[{p}] modified"
