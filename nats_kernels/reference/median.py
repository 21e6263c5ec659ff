"""PyTorch reference of SPEC §3: exact median of pairwise Euclidean distances, memory-bounded.

Algorithm (the same one the compiled backends implement):

1. Work in float32 (float64 for float64 inputs). Scale each problem by a power of two 2**-e
   (e from the largest |coordinate|, clamped) so that its coordinates are below 1 in magnitude:
   exact, it changes no rounding (the result is bit-identical to the unscaled computation
   whenever that one neither overflows nor underflows), and the norms below can neither overflow
   for large inputs nor underflow for tiny ones. Centre the points on their mean, which leaves
   distances unchanged and shrinks the cancellation of the ``|a|^2 + |b|^2 - 2<a, b>`` expansion.
2. Squared distances are produced tile by tile (a batched GEMM per tile; tiles above the diagonal
   only for the pairwise form, with the diagonal tile masked to i < j). The tiling depends only on
   the shapes and the memory budget, so a recomputed tile is bit-identical.
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

Memory: a tile of T x T keys needs ``_tile_bytes_per_element`` bytes per key at its peak (the
key, the int64 bin, a shifted copy of the key, masks; every step in place where it can be), so
the tile side is chosen from the budget with that figure. On top of the budget come the centred
work copies of the inputs and the (B, 65536) int64 histograms.

NaN or Inf anywhere in a batch element's input makes its result NaN (a distance involving a
non-finite coordinate is undefined).
"""

from __future__ import annotations

import math

import torch

DIGIT_BITS = 16
NBINS = 1 << DIGIT_BITS


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
    bound = 768 if work == torch.float64 else 96  # 3/4 of the max exponent, 1024 / 128
    return torch.frexp(big).exponent.clamp(-bound, bound)


def _pow2(e: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """2**e in ``work``, built from the exponent bits (exact; e must keep it a normal number)."""
    if work == torch.float64:
        return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((e + 127) << 23).view(torch.float32)


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


def median_pairwise_distance_ref(x, y, squared: bool, memory_budget: int) -> torch.Tensor:
    """x: (B, N, d); y: (B, M, d) or None. Returns the (B,) lower medians in x's dtype."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    key_dtype = torch.int64 if work == torch.float64 else torch.int32
    key_bits = 64 if work == torch.float64 else 32
    per_element = _tile_bytes_per_element(key_bits // 8)
    batch, n, d = x.shape
    device = x.device

    pairwise = y is None
    m = n if pairwise else y.shape[1]
    n_pairs = n * (n - 1) // 2 if pairwise else n * m
    if batch == 0:
        return torch.empty(0, dtype=x.dtype, device=device)
    nonfinite = ~torch.isfinite(x).flatten(1).all(1)
    if not pairwise:
        nonfinite |= ~torch.isfinite(y).flatten(1).all(1)
    if d > 0:
        exponent = _pow2_exponent(x, y, work)
    else:
        exponent = torch.zeros(batch, dtype=torch.int32, device=device)
    down = _pow2(-exponent, work).view(batch, 1, 1)
    # x * down is a new tensor in the work dtype (type promotion), centred in place.
    a = x * down
    if pairwise:
        a -= a.mean(1, keepdim=True)
        b = a
    else:
        b = y * down
        centre = (a.sum(1, keepdim=True) + b.sum(1, keepdim=True)) / (n + m)
        a -= centre
        b -= centre
    norm_a = (a * a).sum(-1)
    norm_b = norm_a if pairwise else (b * b).sum(-1)

    half = memory_budget // 2
    t = min(_tile_size(half, batch, per_element), max(n, m))
    blocks = list(_tiles(n, m, t, pairwise))
    stored_bytes = sum((i1 - i0) * (j1 - j0) for i0, i1, j0, j1, _ in blocks) * batch * (
        key_bits // 8
    )
    materialize = stored_bytes <= half
    if not materialize:
        t = min(_tile_size(memory_budget, batch, per_element), max(n, m))
        blocks = list(_tiles(n, m, t, pairwise))

    def keys_of(i0, i1, j0, j1):
        d2 = norm_a[:, i0:i1, None] + norm_b[:, None, j0:j1]
        d2.baddbmm_(a[:, i0:i1], b[:, j0:j1].transpose(1, 2), alpha=-2)
        # Rounding can push a tiny squared distance below zero; + 0.0 turns -0.0 into +0.0 so
        # the bit patterns stay ordered. NaN only comes from NaN/Inf inputs (result NaN anyway).
        d2.clamp_min_(0).nan_to_num_(nan=math.inf, posinf=math.inf).add_(0.0)
        return d2.view(key_dtype)

    cache: list[torch.Tensor] = []
    invalid_diag: dict[tuple[int, int], torch.Tensor] = {}
    offsets = (torch.arange(batch, device=device, dtype=torch.int64) * NBINS).view(batch, 1, 1)
    sentinel = batch * NBINS
    one = torch.ones((), dtype=torch.int64, device=device)

    prefix = torch.zeros(batch, dtype=torch.int64, device=device)
    rank = torch.full((batch,), (n_pairs - 1) // 2, dtype=torch.int64, device=device)
    for p in range(key_bits // DIGIT_BITS):
        shift = key_bits - DIGIT_BITS * (p + 1)
        counts = torch.zeros(sentinel + 1, dtype=torch.int64, device=device)
        prefix_key = prefix.to(key_dtype).view(batch, 1, 1) if p > 0 else None
        for idx, (i0, i1, j0, j1, diagonal) in enumerate(blocks):
            if materialize and p > 0:
                keys = cache[idx]
            else:
                keys = keys_of(i0, i1, j0, j1)
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
        cumulative = counts[:sentinel].view(batch, NBINS).cumsum(1)
        digit = torch.searchsorted(cumulative, rank[:, None], right=True)
        below = torch.where(
            digit > 0, cumulative.gather(1, (digit - 1).clamp_min(0)), torch.zeros_like(digit)
        )
        rank = rank - below[:, 0]
        prefix = (prefix << DIGIT_BITS) | digit[:, 0]

    value = prefix.to(key_dtype).view(work)
    up = _pow2(exponent, work)
    # Undo the scaling: exact, unless the true value lies beyond the dtype's range.
    value = value * up * up if squared else value.sqrt() * up
    value = torch.where(nonfinite, torch.full_like(value, math.nan), value)
    return value.to(x.dtype)
