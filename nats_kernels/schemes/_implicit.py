"""The implicit best-response term of :class:`~nats_kernels.schemes.BRC`'s ``"cg"`` and
``"neumann"`` solvers (design §5.4): ``v`` with ``(H_DD + damping I) v = dF/dD`` from
Hessian-vector products through the discriminator, on lists of tensors, with the fused list ops
(``multi_dot`` for inner products, ``aw_combine_`` for ``a*x + b*y``). A fixed number of
iterations and every step size a 0-d device tensor: nothing is read on the host.

Every list here holds the discriminator's *active* parameters only: those whose gradient of f
depends on some parameter (a gradient that is None or constant has zero rows in H_DD and H_GD,
so it takes no part in the solve nor in the correction).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..ops import aw_combine_, multi_dot

Vector = list[Tensor]


def hvp_operator(grad_f: Sequence[Tensor], params: Sequence[Tensor], damping: float
                 ) -> Callable[[Vector], Vector]:
    """``p -> (H + damping I) p`` with ``H p = d<grad_f, p>/d params`` (one double backward
    through the graph of ``grad_f``, which must have been built with ``create_graph=True``;
    the graph is kept for the next product)."""

    def apply(p: Vector) -> Vector:
        hp = torch.autograd.grad(grad_f, params, grad_outputs=p, retain_graph=True,
                                 allow_unused=True)
        hp = [torch.zeros_like(q) if h is None else h for h, q in zip(hp, p)]
        if damping:
            aw_combine_(hp, hp, p, 1.0, damping)
        return hp

    return apply


def dot(a: Vector, b: Vector) -> Tensor:
    """<a, b> over the whole list, a 0-d tensor in the accumulation dtype."""
    return multi_dot(a, b)[2]


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 0 where den is 0 (a converged or zero right-hand side: no NaN)."""
    zero = torch.zeros_like(num)
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), zero)


def conjugate_gradient(apply: Callable[[Vector], Vector], b: Vector, iters: int
                       ) -> tuple[Vector, Tensor]:
    """``iters`` steps of conjugate gradients on ``A x = b`` from x = 0 (``apply`` = A,
    symmetric; positive definite for the method to converge). Returns x and the recursive
    residual ``|b - A x| / |b|`` (0 for b = 0)."""
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rs0 = dot(r, r)
    rs = rs0
    for _ in range(iters):
        ap = apply(p)
        alpha = _ratio(rs, dot(p, ap))
        aw_combine_(x, x, p, 1.0, alpha)
        aw_combine_(r, r, ap, 1.0, -alpha)
        rs_new = dot(r, r)
        aw_combine_(p, r, p, 1.0, _ratio(rs_new, rs))
        rs = rs_new
    return x, _ratio(rs, rs0).sqrt()


def neumann(apply: Callable[[Vector], Vector], b: Vector, iters: int, alpha: float
            ) -> tuple[Vector, Tensor]:
    """The truncated Neumann series ``x = alpha * sum_{k=0..iters} (I - alpha A)^k b`` (``iters``
    products with A; it converges to A^-1 b when every eigenvalue of A lies in (0, 2/alpha)).
    Returns x and ``|alpha (I - alpha A)^iters b| / |x|``, the size of the last term taken
    relative to the sum (0 for b = 0)."""
    term = [t.clone() for t in b]
    x = [t.clone() for t in b]
    for _ in range(iters):
        aw_combine_(term, term, apply(term), 1.0, -alpha)
        aw_combine_(x, x, term, 1.0, 1.0)
    torch._foreach_mul_(x, alpha)
    last = multi_dot(term, x)
    return x, _ratio(last[0].sqrt() * alpha, last[1].sqrt())
