"""PyTorch reference of SPEC §3: exact median of pairwise Euclidean distances, memory-bounded.

Algorithm (the same one the compiled backends implement):

1. Work in float32 (float64 for float64 inputs). Centre the points on their mean, which leaves
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
   pass recomputes its tiles. The answer is one of the computed distances, exactly.

NaN or Inf anywhere in a batch element's input makes its result NaN (a distance involving a
non-finite coordinate is undefined). Squared distances that overflow are +Inf, and rank as such.
"""

from __future__ import annotations

import math

import torch

DIGIT_BITS = 16
NBINS = 1 << DIGIT_BITS
# Workspace bytes per tile element: the distance, int64 bin index, digit, masks, the ones added.
_TILE_BYTES_PER_ELEMENT = 40


def _tile_size(budget: int, batch: int) -> int:
    return max(1, math.isqrt(max(budget, 0) // (_TILE_BYTES_PER_ELEMENT * max(batch, 1))))


def _tiles(n: int, m: int, t: int, pairwise: bool):
    """(i0, i1, j0, j1, diagonal) row/column blocks; for pairwise only blocks with some j > i."""
    for i0 in range(0, n, t):
        for j0 in range(i0 if pairwise else 0, m, t):
            yield i0, min(i0 + t, n), j0, min(j0 + t, m), pairwise and i0 == j0


def median_pairwise_distance_ref(x, y, squared: bool, memory_budget: int) -> torch.Tensor:
    """x: (B, N, d); y: (B, M, d) or None. Returns the (B,) lower medians in x's dtype."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    key_dtype = torch.int64 if work == torch.float64 else torch.int32
    key_bits = 64 if work == torch.float64 else 32
    batch, n = x.shape[0], x.shape[1]
    device = x.device

    pairwise = y is None
    xw = x.to(work)
    if pairwise:
        a = b = xw - xw.mean(1, keepdim=True)
        m = n
        n_pairs = n * (n - 1) // 2
        nonfinite = ~torch.isfinite(x).flatten(1).all(1)
    else:
        yw = y.to(work)
        m = y.shape[1]
        centre = (xw.sum(1, keepdim=True) + yw.sum(1, keepdim=True)) / (n + m)
        a, b = xw - centre, yw - centre
        n_pairs = n * m
        nonfinite = ~(torch.isfinite(x).flatten(1).all(1) & torch.isfinite(y).flatten(1).all(1))
    if batch == 0:
        return torch.empty(0, dtype=x.dtype, device=device)
    norm_a = (a * a).sum(-1)
    norm_b = norm_a if pairwise else (b * b).sum(-1)

    half = memory_budget // 2
    t = min(_tile_size(half, batch), max(n, m))
    blocks = list(_tiles(n, m, t, pairwise))
    stored_bytes = sum((i1 - i0) * (j1 - j0) for i0, i1, j0, j1, _ in blocks) * batch * (
        key_bits // 8
    )
    materialize = stored_bytes <= half
    if not materialize:
        t = min(_tile_size(memory_budget, batch), max(n, m))
        blocks = list(_tiles(n, m, t, pairwise))

    def keys_of(i0, i1, j0, j1):
        d2 = torch.baddbmm(
            norm_a[:, i0:i1, None] + norm_b[:, None, j0:j1],
            a[:, i0:i1],
            b[:, j0:j1].transpose(1, 2),
            alpha=-2,
        )
        # Rounding can push a tiny squared distance below zero; + 0.0 turns -0.0 into +0.0 so
        # the bit patterns stay ordered. NaN only comes from Inf - Inf of overflowing norms.
        d2 = torch.nan_to_num(d2.clamp_min(0), nan=math.inf, posinf=math.inf) + 0.0
        return d2.view(key_dtype)

    cache: list[torch.Tensor] = []
    diag_masks: dict[tuple[int, int], torch.Tensor] = {}
    offsets = (torch.arange(batch, device=device, dtype=torch.int64) * NBINS).view(batch, 1, 1)
    sentinel = batch * NBINS
    ones = torch.ones(batch * t * t, dtype=torch.int64, device=device)

    prefix = torch.zeros(batch, dtype=torch.int64, device=device)
    rank = torch.full((batch,), (n_pairs - 1) // 2, dtype=torch.int64, device=device)
    for p in range(key_bits // DIGIT_BITS):
        shift = key_bits - DIGIT_BITS * (p + 1)
        counts = torch.zeros(sentinel + 1, dtype=torch.int64, device=device)
        for idx, (i0, i1, j0, j1, diagonal) in enumerate(blocks):
            if materialize and p > 0:
                keys = cache[idx]
            else:
                keys = keys_of(i0, i1, j0, j1)
                if materialize:
                    cache.append(keys)
            bins = ((keys >> shift) & (NBINS - 1)).to(torch.int64) + offsets
            valid = None
            if p > 0:
                valid = (keys >> (shift + DIGIT_BITS)).to(torch.int64) == prefix.view(batch, 1, 1)
            if diagonal:
                shape = (i1 - i0, j1 - j0)
                if shape not in diag_masks:
                    diag_masks[shape] = torch.ones(shape, dtype=torch.bool, device=device).triu(1)
                mask = diag_masks[shape]
                valid = mask if valid is None else valid & mask
            if valid is not None:
                bins = torch.where(valid, bins, sentinel)
            flat = bins.reshape(-1)
            counts.index_add_(0, flat, ones[: flat.numel()])
        cumulative = counts[:sentinel].view(batch, NBINS).cumsum(1)
        digit = torch.searchsorted(cumulative, rank[:, None], right=True)
        below = torch.where(
            digit > 0, cumulative.gather(1, (digit - 1).clamp_min(0)), torch.zeros_like(digit)
        )
        rank = rank - below[:, 0]
        prefix = (prefix << DIGIT_BITS) | digit[:, 0]

    value = prefix.to(key_dtype).view(work)
    if not squared:
        value = value.sqrt()
    value = torch.where(nonfinite, torch.full_like(value, math.nan), value)
    return value.to(x.dtype)
