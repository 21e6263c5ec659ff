"""PyTorch reference of design §5: the IGA ratio and the generator-gradient correction.
Arguments arrive validated (see nats_kernels/ops/iga.py)."""

from __future__ import annotations

from .._validate import acc_dtype
from .aw import multi_dot_ref


def iga_ratio_ref(gf, gF, eps):
    """r = <gf, gF> / (<gf, gf> + eps), a 0-d tensor in the accumulation dtype."""
    dots = multi_dot_ref(gf, gF)
    return dots[2] / (dots[0] + eps)


def iga_correction_ref(g, gf, r) -> None:
    """g[p] -= r * gf[p], in place."""
    acc = acc_dtype(g[0].dtype)
    r = r.to(acc)
    corrected = [x.to(acc) - r * y.to(acc) for x, y in zip(g, gf)]
    for x, c in zip(g, corrected):
        x.copy_(c)
