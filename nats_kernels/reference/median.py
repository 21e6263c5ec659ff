"""PyTorch reference of design §3: exact median of pairwise Euclidean distances, memory-bounded.

Algorithm (the same one the compiled backends implement):

1. Work in float32 (float64 for float64 inputs). Scale each problem by a power of two 2**-e
   (e from the largest |coordinate|, clamped) so that its coordinates are below 1 in magnitude:
   exact, it changes no rounding (the result is bit-identical to the unscaled computation
   whenever that one neither overflows nor underflows), and the norms below can neither overflow
   for large inputs nor underflow for tiny ones. Centre the points on their mean, which leaves
   distances unchanged and shrinks the cancellation of the ``|a|^2 + |b|^2 - 2<a, b>`` expansion.
2. Squared distances are produced tile by tile (a batched GEMM per tile; tiles above the diagonal
   only for the pairwise form, with the diagonal tile masked to i < j). The tiling depends only on
   the shapes and the memory budget (:func:`tile_plan`), so a recomputed tile is bit-identical.
3. Squared distances are >= +0.0, so their IEEE bit patterns, read as integers, order exactly like
   the values. The k-th smallest key, k = (n - 1) // 2 (the lower median), is found by radix
   selection with 16-bit digits: each pass histograms the next digit of the keys that match the
   prefix fixed so far (int64 counts), then a cumulative sum picks the digit holding rank k.
   Two passes pin a float32 key, four a float64 key. The number of passes is fixed, so no value
   is ever read back to the host.
4. If all keys fit in half the memory budget they are kept from the first pass; otherwise every
   pass recomputes its tiles. The answer is one of the computed (scaled) distances, exactly; it is
   scaled back by 2**e (2**2e for ``squared``) at the end, where a value beyond the dtype's range
   becomes +Inf (or underflows) as the true value would.

The loop over tiles can be shared out (:func:`radix_median`): each share evaluates a subset of
the tiles and its histograms are summed over the shares before every digit is picked, which is
how :mod:`nats_kernels.distributed.median` splits the work between ranks. The single-process
reference is the one share holding every tile.

Memory: a tile of T x T keys needs ``_tile_bytes_per_element`` bytes per key at its peak (the
key, the int64 bin, a shifted copy of the key, masks; every step in place where it can be), so
the tile side is chosen from the budget with that figure. On top of the budget come the centred
work copies of the inputs and the (B, 65536) int64 histograms.

NaN or Inf anywhere in a batch element's input makes its result NaN (a distance involving a
non-finite coordinate is undefined).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from .._validate import acc_dtype

DIGIT_BITS = 16
NBINS = 1 << DIGIT_BITS


# |coordinate| bound of the scaled problem: 2**e with e clamped to 3/4 of the exponent range of
# the work dtype (1024 / 128), so 2**-e and 2**e are normal numbers.
EXPONENT_BOUND = {torch.float64: 768, torch.float32: 96}


def key_dtype(work: torch.dtype) -> torch.dtype:
    """The integer type whose values order like the non-negative ``work`` floats they alias."""
    return torch.int64 if work == torch.float64 else torch.int32


def _key_bits(dtype: torch.dtype) -> int:
    return key_dtype(acc_dtype(dtype)).itemsize * 8


def _tile_bytes_per_element(key_bytes: int) -> int:
    """Peak workspace bytes per key of a tile, measured with the tile loop of this module: the
    key, its shifted copy and the int64 bin are live together, plus the bool masks; the rest is
    allocator slack (freed blocks the C allocator keeps mapped between tiles)."""
    return 3 * key_bytes + 16


def _tile_size(budget: int, batch: int, per_element: int) -> int:
    return max(1, math.isqrt(max(budget, 0) // (per_element * max(batch, 1))))


def _pow2_exponent(x, y, work: torch.dtype) -> torch.Tensor:
    """(B,) int32 e with every |coordinate| of the problem < 2**e (clamped to +-3/4 of the
    exponent range, so 2**-e and 2**e are normal numbers). 0 for an all-zero problem; NaN/Inf
    problems get some e in range (their result is replaced by NaN anyway). Device-side only."""

    def absmax(t):
        return torch.maximum(t.amax((1, 2)), -t.amin((1, 2))).to(work)

    big = absmax(x) if y is None else torch.maximum(absmax(x), absmax(y))
    bound = EXPONENT_BOUND[work]
    return torch.frexp(big).exponent.clamp(-bound, bound)


def _pow2(e: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """2**e in ``work``, built from the exponent bits (exact; e must keep it a normal number)."""
    if work == torch.float64:
        return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((e + 127) << 23).view(torch.float32)


class Scaled(NamedTuple):
    """The prepared inputs of step 1 (see :func:`scale_and_centre`)."""

    a: torch.Tensor  # (B, n, d) x * 2**-e, centred, in the work dtype
    b: torch.Tensor  # (B, m, d) likewise for y; a itself for the pairwise form
    norm_a: torch.Tensor  # (B, n) squared row norms of a
    norm_b: torch.Tensor  # (B, m) of b; norm_a itself for the pairwise form
    exponent: torch.Tensor  # (B,) int32 e: the inputs were scaled by 2**-e


def scale_and_centre(x, y, work: torch.dtype, *, contiguous: bool = False) -> Scaled:
    """Step 1 of the module docstring, on device (shared with the Triton backend): scale each
    problem by 2**-e (:func:`_pow2_exponent`), centre the points on their mean (of x alone for the
    pairwise form, y None; of x and y together otherwise) and take the squared row norms.
    ``contiguous``: the work copies are new contiguous tensors, else they take x's (y's) layout.
    Either way they hold the same values; the means and norms are torch reductions over them."""
    batch, n, d = x.shape
    if d > 0:
        exponent = _pow2_exponent(x, y, work)
    else:
        exponent = torch.zeros(batch, dtype=torch.int32, device=x.device)
    down = _pow2(-exponent, work).view(batch, 1, 1)

    def scaled(t):
        if not contiguous:
            return t * down  # a new tensor in the work dtype (type promotion)
        out = torch.empty(t.shape, dtype=work, device=t.device)
        return torch.mul(t, down, out=out)

    a = scaled(x)  # centred in place below
    if y is None:
        a -= a.mean(1, keepdim=True)
        b = a
    else:
        b = scaled(y)
        centre = (a.sum(1, keepdim=True) + b.sum(1, keepdim=True)) / (n + y.shape[1])
        a -= centre
        b -= centre
    norm_a = (a * a).sum(-1)
    norm_b = norm_a if y is None else (b * b).sum(-1)
    return Scaled(a, b, norm_a, norm_b, exponent)


def _tiles(n: int, m: int, t: int, pairwise: bool):
    """(i0, i1, j0, j1, diagonal) row/column blocks; for pairwise only blocks with some j > i."""
    for i0 in range(0, n, t):
        for j0 in range(i0 if pairwise else 0, m, t):
            yield i0, min(i0 + t, n), j0, min(j0 + t, m), pairwise and i0 == j0


def _count_tile(counts, keys, shift, prefix_key, offsets, invalid, sentinel, one) -> None:
    """Add the histogram of the next digit of ``keys`` (B, ti, tj) to ``counts``: keys whose
    higher digits differ from ``prefix_key`` (B, 1, 1; None on the first pass) or that ``invalid``
    (ti, tj) marks go to the ``sentinel`` bin. A function of its own so that every temporary is
    freed when it returns (peak: the key, its shifted copy or the bool mask, the int64 bin)."""
    drop = None
    if prefix_key is not None:
        drop = torch.ne(keys >> (shift + DIGIT_BITS), prefix_key)
    if invalid is not None:
        drop = invalid if drop is None else drop.logical_or_(invalid)
    bins = keys.to(torch.int64, copy=True)  # a copy even for int64 keys: shifted in place
    bins >>= shift
    bins &= NBINS - 1
    bins += offsets
    if drop is not None:
        bins.masked_fill_(drop, sentinel)
    flat = bins.view(-1)
    counts.index_add_(0, flat, one.expand(flat.numel()))


class TilePlan(NamedTuple):
    """The tiling of one problem shape: the tile side, the blocks in their fixed order (see
    :func:`_tiles`) and whether every key fits in half the budget (then the tiles were sized for
    the other half, and the keys are kept between passes)."""

    tile: int
    blocks: list[tuple[int, int, int, int, bool]]
    keys_fit: bool


def _keys_bytes(blocks, batch: int, key_bytes: int) -> int:
    return sum((i1 - i0) * (j1 - j0) for i0, i1, j0, j1, _ in blocks) * batch * key_bytes


def tile_plan(
    batch: int, n: int, m: int, pairwise: bool, dtype: torch.dtype, memory_budget: int
) -> TilePlan:
    """The tiles this module evaluates for ``batch`` problems of ``n`` x ``m``
    points (``m == n`` for the pairwise form) in ``dtype`` under ``memory_budget``: tiles sized
    for half the budget when all their keys fit in the other half, else tiles sized for the
    whole budget (recomputed on every pass). A function of the shapes and the budget only."""
    key_bytes = _key_bits(dtype) // 8
    per_element = _tile_bytes_per_element(key_bytes)
    half = memory_budget // 2
    t = min(_tile_size(half, batch, per_element), max(n, m))
    blocks = list(_tiles(n, m, t, pairwise))
    if _keys_bytes(blocks, batch, key_bytes) <= half:
        return TilePlan(t, blocks, True)
    t = min(_tile_size(memory_budget, batch, per_element), max(n, m))
    return TilePlan(t, list(_tiles(n, m, t, pairwise)), False)


def keeps_keys(plan: TilePlan, blocks, batch: int, dtype: torch.dtype, memory_budget: int) -> bool:
    """Whether the keys of ``blocks`` (a subset of ``plan.blocks``) are kept between passes:
    when they fit in half the budget and the plan's tiles are no larger than tiles sized for
    the other half (the keys of the tile being computed come on top of the kept ones). For all
    of the plan's blocks this is ``plan.keys_fit``."""
    key_bytes = _key_bits(dtype) // 8
    half = memory_budget // 2
    half_tile = _tile_size(half, batch, _tile_bytes_per_element(key_bytes))
    return _keys_bytes(blocks, batch, key_bytes) <= half and plan.tile <= half_tile


def _tile_keys(a, b, norm_a, norm_b, i0, i1, j0, j1, kdt) -> torch.Tensor:
    """The (B, i1 - i0, j1 - j0) keys of one tile: its squared distances' bit patterns."""
    d2 = norm_a[:, i0:i1, None] + norm_b[:, None, j0:j1]
    d2.baddbmm_(a[:, i0:i1], b[:, j0:j1].transpose(1, 2), alpha=-2)
    # Rounding can push a tiny squared distance below zero; + 0.0 turns -0.0 into +0.0 so the
    # bit patterns stay ordered. NaN only comes from NaN/Inf inputs (result NaN anyway).
    d2.clamp_min_(0).nan_to_num_(nan=math.inf, posinf=math.inf).add_(0.0)
    return d2.view(kdt)


def median_pairwise_distance_ref(x, y, squared: bool, memory_budget: int) -> torch.Tensor:
    """x: (B, N, d); y: (B, M, d) or None. Returns the (B,) lower medians in x's dtype."""
    return radix_median(x, y, squared, memory_budget)


def radix_median(
    x,
    y,
    squared: bool,
    memory_budget: int,
    *,
    rank: int = 0,
    world: int = 1,
    reduce: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The algorithm of this module, on a share of the tiles: x (B, N, d), y (B, M, d) or None.

    Evaluates the tiles ``tile_plan(...).blocks[rank::world]`` only, and calls ``reduce(counts)``
    on each pass's int64 histogram (``B * 65536 + 1`` counts, the last one a sentinel) before
    selecting a digit from it; ``reduce`` must leave in ``counts``, in place, the sum of the
    histograms of all ``world`` shares (an all-reduce). With the defaults (one share holding every
    tile, no reduction) this is the single-process reference. Every share must run this with
    the same x, y, squared and budget: the result is then the same on all of them, bit for bit
    the single-process one, since the same tiles are computed by the same ops and integer counts
    add up exactly in any order. Returns the (B,) lower medians in x's dtype.
    """
    work = acc_dtype(x.dtype)
    kdt = key_dtype(work)
    key_bits = _key_bits(x.dtype)
    batch, n, _ = x.shape
    device = x.device

    pairwise = y is None
    m = n if pairwise else y.shape[1]
    n_pairs = n * (n - 1) // 2 if pairwise else n * m
    if batch == 0:
        return torch.empty(0, dtype=x.dtype, device=device)
    nonfinite = ~torch.isfinite(x).flatten(1).all(1)
    if not pairwise:
        nonfinite |= ~torch.isfinite(y).flatten(1).all(1)
    a, b, norm_a, norm_b, exponent = scale_and_centre(x, y, work)

    plan = tile_plan(batch, n, m, pairwise, x.dtype, memory_budget)
    blocks = plan.blocks[rank::world]
    materialize = keeps_keys(plan, blocks, batch, x.dtype, memory_budget)

    cache: list[torch.Tensor] = []
    invalid_diag: dict[tuple[int, int], torch.Tensor] = {}
    offsets = (torch.arange(batch, device=device, dtype=torch.int64) * NBINS).view(batch, 1, 1)
    sentinel = batch * NBINS
    one = torch.ones((), dtype=torch.int64, device=device)

    prefix = torch.zeros(batch, dtype=torch.int64, device=device)
    rank_k = torch.full((batch,), (n_pairs - 1) // 2, dtype=torch.int64, device=device)
    for p in range(key_bits // DIGIT_BITS):
        shift = key_bits - DIGIT_BITS * (p + 1)
        counts = torch.zeros(sentinel + 1, dtype=torch.int64, device=device)
        prefix_key = prefix.to(kdt).view(batch, 1, 1) if p > 0 else None
        for idx, (i0, i1, j0, j1, diagonal) in enumerate(blocks):
            if materialize and p > 0:
                keys = cache[idx]
            else:
                keys = _tile_keys(a, b, norm_a, norm_b, i0, i1, j0, j1, kdt)
                if materialize:
                    cache.append(keys)
            invalid = None
            if diagonal:
                shape = (i1 - i0, j1 - j0)
                if shape not in invalid_diag:
                    # pairs i >= j of a diagonal block are not counted (j > i only)
                    invalid_diag[shape] = torch.ones(shape, dtype=torch.bool, device=device).tril()
                invalid = invalid_diag[shape]
            _count_tile(counts, keys, shift, prefix_key, offsets, invalid, sentinel, one)
            del keys
        if reduce is not None:
            reduce(counts)
        cumulative = counts[:sentinel].view(batch, NBINS).cumsum(1)
        digit = torch.searchsorted(cumulative, rank_k[:, None], right=True)
        below = torch.where(
            digit > 0, cumulative.gather(1, (digit - 1).clamp_min(0)), torch.zeros_like(digit)
        )
        rank_k = rank_k - below[:, 0]
        prefix = (prefix << DIGIT_BITS) | digit[:, 0]

    value = prefix.to(kdt).view(work)
    up = _pow2(exponent, work)
    # Undo the scaling: exact, unless the true value lies beyond the dtype's range.
    value = value * up * up if squared else value.sqrt() * up
    value = torch.where(nonfinite, torch.full_like(value, math.nan), value)
    return value.to(x.dtype)
