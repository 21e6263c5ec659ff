"""Helpers shared by the multi-tensor op tests (test_aw.py, test_iga.py): tensor lists in
several memory layouts, snapshots and the comparison of what must stay unchanged."""

from __future__ import annotations

import torch
from helpers import make


def acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / result dtype (design §9.1): float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


LAYOUTS = ("contiguous", "strided", "transposed", "mixed")


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


def snapshot(ts):
    return [t.clone() for t in ts]


def assert_unchanged(ts, before, what):
    """Bit for bit the same values (NaN where there was NaN)."""
    for p, (t, b) in enumerate(zip(ts, before)):
        same = (t == b) | (t.isnan() & b.isnan())
        assert t.dtype == b.dtype and t.shape == b.shape and same.all(), f"{what}[{p}] modified"
