"""design §3: exact median pairwise distance (NATS Technique 1)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _dispatch
from .. import _validate as v

#: Workspace the median may use by default for distance tiles and kept keys, in bytes (the
#: centred work copy of the inputs and the (B, 65536) histograms come on top).
DEFAULT_MEMORY_BUDGET = 256 * 2**20
# The schema's int is int64.
MAX_MEMORY_BUDGET = 2**63 - 1


@torch.library.custom_op("nats_kernels::median_pairwise_distance", mutates_args=())
def _median_op(x: Tensor, y: Tensor | None, squared: bool, memory_budget: int) -> Tensor:
    return _dispatch.route("median_pairwise_distance", x.device)(x, y, squared, memory_budget)


@_median_op.register_fake
def _(x, y, squared, memory_budget):
    return x.new_empty((x.shape[0],))


def check_memory_budget(memory_budget) -> int:
    """``memory_budget`` as an int: :data:`DEFAULT_MEMORY_BUDGET` for None, else a positive int
    that fits the schema's int64 (TypeError / ValueError otherwise)."""
    if memory_budget is None:
        return DEFAULT_MEMORY_BUDGET
    if not v.is_int(memory_budget):
        raise TypeError(f"memory_budget must be an int (bytes), got {type(memory_budget).__name__}")
    if not 0 < memory_budget <= MAX_MEMORY_BUDGET:
        raise ValueError(
            f"memory_budget must be a positive number of bytes up to 2**63 - 1, got {memory_budget}"
        )
    return int(memory_budget)


def median_pairwise_distance(
    x: Tensor,
    y: Tensor | None = None,
    *,
    squared: bool = False,
    batched: bool = False,
    memory_budget: int | None = None,
) -> Tensor:
    """Exact lower median of Euclidean distances between samples, without the N x N matrix.

    With ``y`` None: the median over the ``N(N-1)/2`` pairs ``i < j`` of rows of ``x``. With
    ``y``: the median over all ``N*M`` pairs (row of ``x``, row of ``y``). The lower median is
    element ``(n-1)//2`` of the ``n`` sorted distances, as ``torch.median`` returns. Selection
    is exact (radix selection on the float bits of tile-wise distances, int64 counts); the
    result is one of the computed distances.

    Args:
        x: ``(N, *feat)``, or ``(B, N, *feat)`` with ``batched=True``; feature dims are
            flattened. Floating dtype. (``batched`` is explicit because a 4-d image batch
            ``(N, C, H, W)`` would otherwise be ambiguous.)
        y: optional ``(M, *feat)`` / ``(B, M, *feat)`` with x's feature shape, dtype, device.
        squared: return the median squared distance instead.
        batched: treat the first dim of ``x`` (and ``y``) as a batch of independent problems.
        memory_budget: bytes of workspace (default :data:`DEFAULT_MEMORY_BUDGET`); decides the
            tile size and whether distances are kept between passes or recomputed.

    Returns:
        A 0-d tensor (``(B,)`` if batched) in x's dtype; distances are computed in float32
        (float64 for float64 inputs). NaN for a problem whose input holds NaN or Inf.
        Not differentiable.

    Raises:
        TypeError: non-tensor or non-floating input, dtype of y differing from x, a
            ``squared``/``batched`` that is not a bool, a ``memory_budget`` that is not an int.
        ValueError: fewer than 2 samples (pairwise) or an empty set (cross), shape or batch
            mismatch between x and y, different devices, a memory budget that is not positive
            or does not fit in int64.
    """
    if v.cpu_fast("median_pairwise_distance"):  # design §8.1: checked and run in C++
        result = v.native.cpu_median_pairwise_distance(
            x, y, squared, batched,
            DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget)
        if result is not None:
            return result
    v.tensor("x", x)
    squared = v.flag("squared", squared)
    batched = v.flag("batched", batched)
    lead = 2 if batched else 1
    if x.dim() < lead:
        raise ValueError(
            f"x must have shape {'(B, N, *feat)' if batched else '(N, *feat)'}, "
            f"got {tuple(x.shape)}"
        )
    feat = x.shape[lead:]
    d = math.prod(feat)
    batch = x.shape[0] if batched else 1
    n = x.shape[lead - 1]
    xb = x.reshape(batch, n, d)
    yb = None
    if y is None:
        if n < 2:
            raise ValueError(f"x must hold at least 2 samples for pairwise distances, got N = {n}")
    else:
        v.tensor("y", y)
        v.same_device(x.device, y=y)
        v.same_dtype("y", y, x.dtype, "x")
        if y.dim() != x.dim() or y.shape[lead:] != feat or (batched and y.shape[0] != batch):
            want = f"({'B=' + str(batch) + ', ' if batched else ''}M, {', '.join(map(str, feat))})"
            raise ValueError(f"y must have shape {want} to match x, got {tuple(y.shape)}")
        m = y.shape[lead - 1]
        if n < 1 or m < 1:
            raise ValueError(f"x and y must each hold at least 1 sample, got N = {n}, M = {m}")
        yb = y.reshape(batch, m, d)
    memory_budget = check_memory_budget(memory_budget)
    if _dispatch.eager(xb, (yb,)):  # design §8.1: no custom-op hop
        result = _dispatch.route("median_pairwise_distance", x.device)(
            xb, yb, squared, memory_budget)
    else:
        result = _median_op(xb, yb, squared, memory_budget)
    return result if batched else result[0]
