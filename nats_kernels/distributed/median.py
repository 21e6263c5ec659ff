"""design §3 under ``torch.distributed``: the exact median pairwise distance of the union of every
rank's shard of samples, with the tiles of distances shared out between the ranks.

Each rank holds a shard ``x`` of shape ``(N_rank, *feat)`` (and ``y``, ``(M_rank, *feat)``, for
the cross form); the problem is the one of :func:`nats_kernels.median_pairwise_distance` on the
shards concatenated in the order of the ranks of the process group. Shards may differ in size
and may be empty.

How (the algorithm of :mod:`nats_kernels.reference.median`, whose docstring it follows):

1. One all-gather of a small fixed-size int64 record per rank (its error code if its own input
   checks failed, N_rank, M_rank, the feature shape's numel and digest, a dtype code, whether
   ``y`` is given), read on the host once: every rank takes the same decision on the same
   table, so a bad input raises on every rank alike and never leaves ranks waiting in a
   collective.
2. All-gather of the shards (as bytes, padded to the largest shard): every rank then holds the
   concatenated ``x`` (and ``y``) and runs the same scaling and centring on it, bit for bit.
3. The tile plan is :func:`nats_kernels.reference.median.tile_plan` of the global shapes and the
   budget, the one the single-process reference uses. Rank ``r`` of ``world`` evaluates the
   tiles ``blocks[r::world]`` only; the int64 histogram of every radix pass is all-reduced
   (SUM) before the digit is picked, so all ranks select the same digits. A rank keeps its own
   tiles' keys between passes when they fit in half the budget and the tiles are sized for the
   other half (:func:`nats_kernels.reference.median.keeps_keys`), else recomputes them.

Exactness: the result is bit-identical, on every rank, to the single-process
``nats_kernels.median_pairwise_distance`` of the concatenated shards computed by the reference
backend (``NATS_KERNELS_BACKEND=reference``) with the same ``memory_budget`` on the same device:
the same tiles are computed by the same torch ops on the same tensors, and integer counts add up
exactly in any order. (This relies on torch's ops giving the same bits for the same tensors in
every process: the same torch build and device type, and on CPU the same number of threads, as
a reduction over more than one parallel grain is split by thread.) Against the compiled
backends (the C++ kernel is the default on CPU) it agrees within their tolerances; on exactly
representable data (integer coordinates, every squared distance, norm and dot product exact)
the squared median is the same bit for bit, and the distance is its square root in the work
dtype, so it differs at most by the one ulp that square roots may differ between backends.
When torch.distributed is not initialized, or the group has one rank, this is the
single-process op itself (whatever backend it picks).

Memory per rank: the padded receive buffer of the all-gather (world x largest shard, in x's
dtype) and the concatenated inputs (N x d and M x d), the centred work copies of the inputs in
the work dtype with their norms, the ``memory_budget`` (tiles and kept keys) and the
histogram: 65536 + 1 int64 counts and their cumulative sum, about 1 MiB. Nothing of size N x M.

Traffic per rank: the all-gather of the metadata (a few int64 per rank), the all-gather of the
inputs (each rank receives world x largest shard rows of x, and of y), then one all-reduce of
65536 + 1 int64 counts (512 KiB) per radix pass: 2 passes for float32 work (float16, bfloat16
and float32 inputs), 4 for float64.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _validate as v
from ..ops.median import check_memory_budget
from ..ops.median import median_pairwise_distance as _single_process
from ..reference.median import radix_median

# Layout of the per-rank metadata record (int64).
_ERROR, _N, _M, _NUMEL, _DIGEST, _DTYPE, _HAS_Y, _SQUARED, _BUDGET = range(9)
_FIELDS = 9
# Error codes: which exception the rank's own input checks raised.
_ERRORS = (None, TypeError, ValueError)


def median_pairwise_distance(
    x: Tensor,
    y: Tensor | None = None,
    *,
    squared: bool = False,
    group: dist.ProcessGroup | None = None,
    memory_budget: int | None = None,
) -> Tensor:
    """Exact lower median of the Euclidean distances over the union of every rank's shard.

    Collective: every rank of ``group`` must call it, with its own shard. With ``y`` None: the
    median over the ``N(N-1)/2`` pairs of rows of the concatenated ``x`` (``N = sum N_rank``);
    with ``y``: over all ``N*M`` pairs (row of the concatenated x, row of the concatenated y).
    The shards are concatenated in the order of the ranks of ``group``. Every rank returns the
    same value. See the module docstring for how the work is split, the exactness against the
    single-process op, memory and traffic.

    Args:
        x: this rank's shard ``(N_rank, *feat)``; feature dims are flattened. Floating dtype;
            ``N_rank`` may be 0. Feature shape and dtype must be the same on every rank.
        y: optional shard ``(M_rank, *feat)`` with x's feature shape, dtype and device; given on
            every rank or on none.
        squared: return the median squared distance instead; the same on every rank.
        group: the process group (default: the default group). When torch.distributed is not
            initialized, or the group has one rank, this is
            :func:`nats_kernels.median_pairwise_distance` of ``x`` (and ``y``).
        memory_budget: bytes of workspace per rank for tiles and kept keys (default
            :data:`nats_kernels.DEFAULT_MEMORY_BUDGET`); the same on every rank (checked: it
            decides the tile plan, which the ranks share out).

    Returns:
        A 0-d tensor in x's dtype on x's device; distances are computed in float32 (float64 for
        float64 inputs). NaN if any shard holds NaN or Inf. Not differentiable.

    Raises (on every rank alike, whichever rank's input is at fault; a rank whose own input
    passed its checks raises the same exception type, naming the rank at fault):
        TypeError: non-tensor or non-floating input, y's dtype differing from x's, a dtype that
            differs between ranks, a ``squared`` that is not a bool, a ``memory_budget`` that
            is not an int.
        ValueError: fewer than 2 samples over all ranks (pairwise) or an empty union of x or y
            shards (cross), y's shape not matching x's, ``squared`` or ``memory_budget``
            differing between ranks, a feature shape that differs between
            ranks, ``y`` given on some ranks only, different devices of x and y, a memory
            budget that is not positive or does not fit in int64, a process that is not a
            member of ``group`` (raised on that process only: the others do not wait for it).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return _single_process(x, y, squared=squared, memory_budget=memory_budget)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the process group it was given")
    world = dist.get_world_size(group)
    if world == 1:
        return _single_process(x, y, squared=squared, memory_budget=memory_budget)

    error = None
    try:
        squared, memory_budget = _check_local(x, y, squared, memory_budget)
    except (TypeError, ValueError) as e:
        error = e
    row = _metadata(x, y, error, squared, memory_budget)
    table = _gather_metadata(row, _device(x, y, group), group, world)
    _check_table(table, error, rank, x)

    ns = [row[_N] for row in table]
    d = table[0][_NUMEL]
    with torch.no_grad():
        xs = _gather_rows(x.detach().reshape(x.shape[0], d), ns, group, world)
        ys = None
        if y is not None:
            ms = [row[_M] for row in table]
            ys = _gather_rows(y.detach().reshape(y.shape[0], d), ms, group, world)[None]

        def reduce(counts: Tensor) -> None:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)

        value = radix_median(
            xs[None], ys, squared, memory_budget, rank=rank, world=world, reduce=reduce
        )
    return value[0]


def _check_local(x, y, squared, memory_budget) -> tuple[bool, int]:
    """The checks of the single-process op that need nothing from the other ranks."""
    v.tensor("x", x)
    squared = v.flag("squared", squared)
    if x.dim() < 1:
        raise ValueError(f"x must have shape (N, *feat), got {tuple(x.shape)}")
    if y is not None:
        v.tensor("y", y)
        v.same_device(x.device, y=y)
        v.same_dtype("y", y, x.dtype, "x")
        if y.dim() != x.dim() or y.shape[1:] != x.shape[1:]:
            want = f"(M, {', '.join(map(str, x.shape[1:]))})"
            raise ValueError(f"y must have shape {want} to match x, got {tuple(y.shape)}")
    return squared, check_memory_budget(memory_budget)


def _digest(feat: tuple[int, ...]) -> int:
    """A 56-bit digest of a feature shape, the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(repr(feat).encode(), digest_size=7).digest(), "little")


def _metadata(x, y, error: Exception | None, squared: bool, budget: int) -> list[int]:
    row = [0] * _FIELDS
    if error is not None:
        row[_ERROR] = _ERRORS.index(type(error)) if type(error) in _ERRORS else 1
        return row
    feat = tuple(x.shape[1:])
    row[_N] = x.shape[0]
    row[_M] = 0 if y is None else y.shape[0]
    row[_NUMEL] = math.prod(feat)
    row[_DIGEST] = _digest(feat)
    row[_DTYPE] = v.FLOATING.index(x.dtype)
    row[_HAS_Y] = int(y is not None)
    row[_SQUARED] = int(squared)
    row[_BUDGET] = budget
    return row


def _device(x, y, group) -> torch.device:
    """Where this rank's collective buffers live: x's device, else (x rejected) y's, else the
    current CUDA device for a NCCL-only group, else the CPU."""
    for t in (x, y):
        if isinstance(t, torch.Tensor):
            return t.device
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_metadata(row: list[int], device, group, world: int) -> list[list[int]]:
    mine = torch.tensor(row, dtype=torch.int64).to(device)
    rows = torch.empty(world, _FIELDS, dtype=torch.int64, device=device)
    dist.all_gather(list(rows.unbind(0)), mine, group=group)
    return rows.tolist()  # the one host read


def _check_table(table: list[list[int]], error, rank: int, x) -> None:
    """Raise, identically on every rank, if any rank's input is bad or the shards disagree."""
    failed = [r for r, row in enumerate(table) if row[_ERROR]]
    if failed:
        if error is not None:
            raise error
        first = failed[0]
        kind = _ERRORS[table[first][_ERROR]]
        raise kind(
            f"rank {first} of the group rejected its input ({kind.__name__}; see that rank's "
            f"error), ranks at fault: {failed}"
        )
    # the tile plan (and so which tiles each rank evaluates) depends on the budget: one that
    # differs between ranks would leave tiles uncounted or counted twice
    for field, name in ((_SQUARED, "squared"), (_BUDGET, "memory_budget")):
        values = [row[field] for row in table]
        if len(set(values)) > 1:
            shown = [bool(x) for x in values] if field == _SQUARED else values
            raise ValueError(f"{name} must be the same on every rank, got {shown} (by rank)")
    has_y = [r for r, row in enumerate(table) if row[_HAS_Y]]
    if has_y and len(has_y) != len(table):
        raise ValueError(f"y must be given on every rank or on none; given on ranks {has_y}")
    dtypes = [v.FLOATING[row[_DTYPE]] for row in table]
    if len(set(dtypes)) > 1:
        raise TypeError(f"x must have the same dtype on every rank, got {dtypes} (by rank)")
    if len({(row[_NUMEL], row[_DIGEST]) for row in table}) > 1:
        numels = [row[_NUMEL] for row in table]
        raise ValueError(
            f"x must have the same feature shape on every rank; rank {rank} has "
            f"{tuple(x.shape[1:])}, feature sizes by rank: {numels}"
        )
    ns = [row[_N] for row in table]
    n = sum(ns)
    if not has_y and n < 2:
        raise ValueError(
            f"x must hold at least 2 samples over all ranks for pairwise distances, got N = {n} "
            f"(by rank: {ns})"
        )
    ms = [row[_M] for row in table]
    if has_y and (n < 1 or sum(ms) < 1):
        raise ValueError(
            f"x and y must each hold at least 1 sample over all ranks, got N = {n}, "
            f"M = {sum(ms)} (by rank: N {ns}, M {ms})"
        )


def _gather_rows(t: Tensor, counts: list[int], group, world: int) -> Tensor:
    """The (sum(counts), d) concatenation, in rank order, of every rank's (counts[r], d) ``t``.
    Sent as bytes (any dtype, NaN payloads included, on any backend), padded to the largest."""
    total, d = sum(counts), t.shape[1]
    if d == 0:
        return t.new_zeros((total, 0))
    row = d * t.element_size()
    longest = max(counts) * row
    send = torch.zeros(longest, dtype=torch.uint8, device=t.device)
    send[: t.shape[0] * row] = t.contiguous().view(torch.uint8).view(-1)
    recv = torch.empty(world, longest, dtype=torch.uint8, device=t.device)
    dist.all_gather(list(recv.unbind(0)), send, group=group)
    parts = [recv[r, : c * row] for r, c in enumerate(counts)]
    return torch.cat(parts).view(t.dtype).view(total, d)
