"""Triton kernels of design §5 (BRC / IGA): iga_ratio and iga_correction_.

Same signatures and semantics as nats_kernels/reference/iga.py; arguments arrive validated.
"""

from __future__ import annotations

from .._dispatch import register
from ._lists import combine, list_dots


@register("triton", "iga_ratio")
def iga_ratio(gf, gF, eps):
    """r = <gf, gF> / (<gf, gf> + eps), a 0-d tensor in float32 (float64 for float64 inputs):
    per-chunk partial sums, then one program adds them in chunk order and divides, on device."""
    return list_dots(gf, gF, eps)


@register("triton", "iga_correction_")
def iga_correction_(g, gf, r) -> None:
    """g[p] -= r * gf[p], in place, as the reference's g - r * gf in the accumulation dtype."""
    combine(g, g, gf, r, r, iga=True)
