"""Triton kernel of design §3: median_pairwise_distance, the exact lower median of pairwise (or
cross) Euclidean distances, without the N x N matrix.

Same signature and semantics as nats_kernels/reference/median.py; arguments arrive validated:
x (B, N, d), y (B, M, d) or None, squared, memory_budget > 0. Returns (B,) in x's dtype.

Algorithm (the reference's, with the selection fused into the distance tiles):

1. Preparation, torch ops on device, the reference's own code
   (``reference.median.scale_and_centre``, into contiguous copies): work in float32 (float64
   for float64 inputs); scale each problem by the power of two 2**-e that brings its
   coordinates below 1 in magnitude (e from the largest |coordinate|, clamped), centre on the
   mean, and take the squared norms of the rows. A problem with NaN or Inf input has non-finite
   norms: the sum of its norms flags it, and its result is NaN.
2. ``_tile_hist_kernel``: grid (B, workers); each program walks the tiles t = w, w + workers,
   ... of its problem (for the pairwise form the tiles on or above the diagonal, the triangle
   folded into a rectangle so that a tile's coordinates take a division, no search; all tiles
   for the cross form). A tile is BT x BT squared distances
   ``(|a|^2 + |b|^2) - 2 <a, b>`` with ``tl.dot(input_precision="ieee")`` over the features in
   BK-wide steps (no TF32), then its epilogue: negative rounding, -0 and NaN become +0, the
   value's IEEE bits are its key (non-negative floats order like their bits), pairs i >= j of
   a diagonal tile and rows/columns past the end are dropped, and the next radix digit of the
   keys that match the prefix fixed so far goes into a per-program ``tl.histogram``. One
   masked int64 ``tl.atomic_add`` of the program's histogram into the problem's global
   histogram at the end: integer atomics, so the counts (and everything after) are exact and
   deterministic whatever the order of the programs.
3. Radix selection with DIGIT = 11-bit digits (2048 bins): 3 passes pin a float32 key (its sign
   bit is always 0: 9 + 11 + 11 bits), 6 a float64 key (8 + 5 * 11). After each pass one
   program per problem (``_select_kernel``) takes the cumulative sum of the counts, finds the
   digit holding rank k (k = (n - 1) // 2 to start with: the lower median), subtracts the count
   below it from the rank and appends the digit to the prefix, all on device, and clears the
   histogram for the next pass. The number of passes is fixed by the dtype, so nothing is ever
   read back to the host; the last select also scales the key back (``value * 2**e * 2**e``
   squared, ``sqrt_rn(value) * 2**e`` otherwise) and writes NaN for non-finite problems, in
   the work dtype; torch rounds a float16/bfloat16 result to x's dtype (as the reference does:
   the interpreter's float32 -> bfloat16 conversion truncates).
4. Memory: a tile lives in registers. When the keys of all tiles (B * tiles * BT * BT keys, 4 or
   8 bytes each) fit half of ``memory_budget``, the first pass also stores them and the later
   passes histogram the stored keys (``_stored_hist_kernel``, no GEMM); otherwise every pass
   recomputes its tiles. Either way the keys are the same bits: the tiling (BT, BK) depends on
   the shapes only, never on the budget or the device, and a stored key is the very value the
   recomputing kernel histograms. Outside the budget: the centred work copies of the inputs,
   their norms and the (B, 2048) int64 histogram.

Counts are int64 throughout (per-tile histograms are int32, at most BT * BT each).

Tile geometry: BT = 128 with 16 warps, 32 accumulators per thread; 32-bit offsets within a
tile from 64-bit scalar bases. Compiled for sm_90 (ptxas), every tile variant uses 128
registers with at most a few dozen bytes of spills; float32 with input_precision="ieee" lowers
to FMAs, float64 to mma.sync m8n8k4 (DMMA); the histogram to shared-memory atomics.

What only a GPU exercises: the interpreter (TRITON_INTERPRET=1) runs these kernels and
launchers as they are (no GPU-only code path), but not Triton's compiler: the lowerings above,
the layout of the reshape before the histogram, register allocation. The interpreter's dot is
numpy's matmul of each K step added to the accumulator, the GPU's a chain of FMAs: both are
deterministic, but interpreted and compiled keys of random data may differ in the last bits.
tests/test_triton_median.py compiles every kernel variant for sm_90 without a GPU. What has run
where: the Status paragraph of README.md.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._dispatch import register
from .._validate import acc_dtype
from ..reference.median import key_dtype, scale_and_centre

# Radix digit: bits per pass and bins per histogram.
DIGIT = 11
NBINS = 1 << DIGIT
# Side of a distance tile (rows of x by rows of y). Fixed: recomputed tiles repeat it exactly.
BT = 128
# Programs per launch (over all problems); each walks its share of the tiles. Any value gives
# the same counts (integer atomics), so it may be tuned freely.
WORKERS = 1024
# Keys per step of the stored-keys histogram.
SBLOCK = 8192
# The dot's K step: the feature count rounded up to a power of two, clamped to [BK_MIN, BK_MAX].
BK_MIN = 8
BK_MAX = 32
# Warps per program: a tile program (BT * BT accumulators, 32 per thread at 16 warps) and a
# stored-keys program. Launch parameters only: the counts do not depend on them.
TILE_WARPS = 16
STORED_WARPS = 8
# The keys are stored when they take at most 1 / KEYS_SHARE of memory_budget (the reference's
# rule: half).
KEYS_SHARE = 2

_NO_SPEC_TILE = ["n", "m", "d", "tiles_j", "n_tiles", "workers", "shift", "keys_sb"]
_NO_SPEC_STORED = ["total", "workers", "shift", "keys_sb"]


@triton.jit(do_not_specialize=_NO_SPEC_TILE)
def _tile_hist_kernel(a_ptr, b_ptr, na_ptr, nb_ptr, prefix_ptr, counts_ptr, keys_ptr,
                      n, m, d, tiles_j, n_tiles, workers, shift, keys_sb,
                      PAIRWISE: tl.constexpr, FIRST: tl.constexpr, STORE: tl.constexpr,
                      T: tl.constexpr, KEY: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      DIGIT: tl.constexpr, NBINS: tl.constexpr):
    """a: (B, n, d), b: (B, m, d) contiguous (b is a for the pairwise form); na, nb their
    squared row norms (B, n), (B, m), contiguous. Adds the histogram of
    digit (key >> shift) & (NBINS - 1) of the selected keys into counts[bat, :]."""
    bat = tl.program_id(0)
    w = tl.program_id(1)
    a_base = a_ptr + bat.to(tl.int64) * n * d
    b_base = b_ptr + bat.to(tl.int64) * m * d
    na_base = na_ptr + bat.to(tl.int64) * n
    nb_base = nb_ptr + bat.to(tl.int64) * m
    keys_base = keys_ptr + bat.to(tl.int64) * keys_sb
    if not FIRST:
        prefix = tl.load(prefix_ptr + bat).to(KEY)
    bins = tl.arange(0, NBINS)
    r = tl.arange(0, BT)
    ks = tl.arange(0, BK)
    hist = tl.full([NBINS], 0, tl.int64)
    for t in range(w, n_tiles, workers):
        t32 = tl.full([], t, tl.int32)
        if PAIRWISE:
            # The upper triangle (diagonal included) of tiles_j x tiles_j tiles (tiles_j even)
            # folded into a rectangle: row p holds triangle row p (tiles p .. tiles_j - 1), then
            # triangle row tiles_j - 1 - p (tiles tiles_j - 1 - p .. tiles_j - 1): tiles_j + 1
            # tiles. A tile past the last row or column of the problem selects no pair.
            p = t32 // (tiles_j + 1)
            c = t32 - p * (tiles_j + 1)
            upper = c < tiles_j - p
            ti = tl.where(upper, p, tiles_j - 1 - p)
            tj = tl.where(upper, p + c, c - 1)
        else:
            ti = t32 // tiles_j
            tj = t32 - ti * tiles_j
        # 64-bit scalar bases, 32-bit offsets within the tile (registers: one int32 per element).
        row0 = ti * BT
        col0 = tj * BT
        row_ok = r < n - row0
        col_ok = r < m - col0
        a_tile = a_base + row0.to(tl.int64) * d
        b_tile = b_base + col0.to(tl.int64) * d
        acc = tl.full([BT, BT], 0, T)
        for k0 in range(0, d, BK):
            k_ok = ks < d - k0
            a_blk = tl.load(a_tile + k0 + (r[:, None] * d + ks[None, :]),
                            mask=row_ok[:, None] & k_ok[None, :], other=0)
            b_blk = tl.load(b_tile + k0 + (ks[:, None] + r[None, :] * d),
                            mask=k_ok[:, None] & col_ok[None, :], other=0)
            acc = tl.dot(a_blk, b_blk, acc, input_precision="ieee")
        na = tl.load(na_base + row0 + r, mask=row_ok, other=0)
        nb = tl.load(nb_base + col0 + r, mask=col_ok, other=0)
        # 2 * acc is exact, so a fused multiply-add gives the same bits as the two steps.
        d2 = (na[:, None] + nb[None, :]) - 2.0 * acc
        d2 = tl.where(d2 > 0, d2, 0.0)  # rounding below 0, -0.0 and NaN -> +0.0
        key = d2.to(KEY, bitcast=True)
        sel = row_ok[:, None] & col_ok[None, :]
        if PAIRWISE:  # j > i: (col0 + c) - (row0 + r) > 0
            sel = sel & (r[None, :] - r[:, None] > row0 - col0)
        if STORE:
            # Dropped pairs are stored as -1: they match no prefix (valid keys are >= 0).
            tl.store(keys_base + t32.to(tl.int64) * (BT * BT) + (r[:, None] * BT + r[None, :]),
                     tl.where(sel, key, -1))
        if not FIRST:
            sel = sel & ((key >> (shift + DIGIT)) == prefix)
        digit = ((key >> shift) & (NBINS - 1)).to(tl.int32)
        # The same (order-preserving) reshape of the digits and of their mask.
        h = tl.histogram(tl.reshape(digit, [BT * BT]), NBINS, mask=tl.reshape(sel, [BT * BT]))
        hist += h.to(tl.int64)
    tl.atomic_add(counts_ptr + bat * NBINS + bins, hist, mask=hist != 0, sem="relaxed")


@triton.jit(do_not_specialize=_NO_SPEC_STORED)
def _stored_hist_kernel(keys_ptr, prefix_ptr, counts_ptr, total, workers, shift, keys_sb,
                        KEY: tl.constexpr, DIGIT: tl.constexpr, NBINS: tl.constexpr,
                        BLOCK: tl.constexpr):
    """The histogram of a later pass over the keys stored by the first one (total per problem,
    dropped pairs stored as -1)."""
    bat = tl.program_id(0)
    w = tl.program_id(1)
    keys_base = keys_ptr + bat.to(tl.int64) * keys_sb
    prefix = tl.load(prefix_ptr + bat).to(KEY)
    bins = tl.arange(0, NBINS)
    hist = tl.full([NBINS], 0, tl.int64)
    for s in range(w.to(tl.int64) * BLOCK, total, workers * BLOCK):
        i = s + tl.arange(0, BLOCK)
        key = tl.load(keys_base + i, mask=i < total, other=-1)
        sel = (key >> (shift + DIGIT)) == prefix
        digit = ((key >> shift) & (NBINS - 1)).to(tl.int32)
        hist += tl.histogram(digit, NBINS, mask=sel).to(tl.int64)
    tl.atomic_add(counts_ptr + bat * NBINS + bins, hist, mask=hist != 0, sem="relaxed")


@triton.jit
def _select_kernel(counts_ptr, prefix_ptr, rank_ptr, exp_ptr, check_ptr, out_ptr,
                   FINAL: tl.constexpr, SQUARED: tl.constexpr, T: tl.constexpr,
                   KEY: tl.constexpr, DIGIT: tl.constexpr, NBINS: tl.constexpr):
    """One program per problem: the digit whose bin holds rank[bat] (int64 cumulative counts),
    the rank within that bin, the prefix extended by the digit; the histogram is cleared for the
    next pass. FINAL: the key is the answer; scale it back and write it in out's dtype."""
    bat = tl.program_id(0)
    bins = tl.arange(0, NBINS)
    counts = tl.load(counts_ptr + bat * NBINS + bins)
    tl.store(counts_ptr + bat * NBINS + bins, tl.full([NBINS], 0, tl.int64))
    cumulative = tl.cumsum(counts, 0)
    rank = tl.load(rank_ptr + bat)
    digit = tl.sum((cumulative <= rank).to(tl.int64), 0)
    below = tl.sum(tl.where(bins < digit, counts, 0), 0)
    prefix = (tl.load(prefix_ptr + bat) << DIGIT) | digit
    tl.store(rank_ptr + bat, rank - below)
    tl.store(prefix_ptr + bat, prefix)
    if FINAL:
        e = tl.load(exp_ptr + bat)
        value = prefix.to(KEY).to(T, bitcast=True)
        # up = 2**e from its IEEE exponent field (bias 1023 / 127 above 52 / 23 fraction bits):
        # reference.median._pow2 on device.
        if T == tl.float64:
            up = ((e.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)
            root = tl.sqrt(value)  # IEEE-rounded for float64
        else:
            up = ((e.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
            root = tl.sqrt_rn(value)
        # Undo the scaling: exact unless the true value lies beyond the dtype's range.
        if SQUARED:
            res = value * up * up
        else:
            res = root * up
        check = tl.load(check_ptr + bat)
        res = tl.where(tl.abs(check) < float("inf"), res, float("nan"))
        tl.store(out_ptr + bat, res)


def shifts(work: torch.dtype) -> list[int]:
    """The digit shifts of the radix passes, most significant digit first: DIGIT-bit digits
    from bit 0 up, enough to cover the 31 (63) value bits of a float32 (float64) key, whose
    sign bit is always 0 (the top digit reaches past the key's width)."""
    key_bits = key_dtype(work).itemsize * 8 - 1
    count = -(-key_bits // DIGIT)
    return [DIGIT * (count - 1 - p) for p in range(count)]


@dataclass
class Problem:
    """The prepared inputs of one call and its launch geometry (shapes only)."""

    a: torch.Tensor            # (B, n, d) scaled, centred, contiguous, work dtype
    b: torch.Tensor            # (B, m, d); a itself for the pairwise form
    norm_a: torch.Tensor       # (B, n) squared row norms
    norm_b: torch.Tensor       # (B, m)
    exponent: torch.Tensor     # (B,) int32: the inputs were scaled by 2**-exponent
    check: torch.Tensor        # (B,) sum of the norms: non-finite for NaN/Inf input
    pairwise: bool
    tiles_j: int               # tile columns (pairwise: rounded up to even, for the fold)
    n_tiles: int               # tiles per problem
    bk: int                    # the dot's K step
    workers: int               # programs per problem of a tile pass
    stored_workers: int        # programs per problem of a stored-keys pass

    @property
    def work(self) -> torch.dtype:
        return self.a.dtype

    @property
    def key_dtype(self) -> torch.dtype:
        return key_dtype(self.work)

    @property
    def keys_per_problem(self) -> int:
        """Stored keys per problem: whole tiles, dropped pairs included."""
        return self.n_tiles * BT * BT

    @property
    def n_pairs(self) -> int:
        n, m = self.a.shape[1], self.b.shape[1]
        return n * (n - 1) // 2 if self.pairwise else n * m

    def keys_bytes(self) -> int:
        return self.a.shape[0] * self.keys_per_problem * self.key_dtype.itemsize


def prepare(x, y) -> Problem:
    """Scale by 2**-e and centre into contiguous work copies; norms; the launch geometry."""
    batch, n, d = x.shape
    work = acc_dtype(x.dtype)
    pairwise = y is None
    m = n if pairwise else y.shape[1]
    a, b, norm_a, norm_b, exponent = scale_and_centre(x, y, work, contiguous=True)
    # Non-finite for exactly the problems with NaN/Inf input (scaled, centred coordinates are
    # below 2 in magnitude otherwise, so no norm and no sum of norms can overflow).
    check = norm_a.sum(1) if pairwise else norm_a.sum(1) + norm_b.sum(1)

    tiles_i, tiles_j = triton.cdiv(n, BT), triton.cdiv(m, BT)
    if pairwise:  # the triangle folded into a rectangle, see _tile_hist_kernel
        tiles_j += tiles_j % 2
        n_tiles = tiles_j // 2 * (tiles_j + 1)
    else:
        n_tiles = tiles_i * tiles_j
    per_launch = triton.cdiv(WORKERS, batch)
    return Problem(
        a=a, b=b, norm_a=norm_a, norm_b=norm_b, exponent=exponent, check=check,
        pairwise=pairwise, tiles_j=tiles_j, n_tiles=n_tiles,
        bk=min(BK_MAX, max(BK_MIN, triton.next_power_of_2(max(d, 1)))),
        workers=max(1, min(n_tiles, per_launch)),
        stored_workers=max(1, min(triton.cdiv(n_tiles * BT * BT, SBLOCK), per_launch)),
    )


def _tl_types(P: Problem):
    if P.work == torch.float64:
        return tl.float64, tl.int64
    return tl.float32, tl.int32


def tile_pass(P: Problem, counts, prefix, shift: int, first: bool, keys=None) -> None:
    """Add the histogram of the digit at ``shift`` of the keys matching ``prefix`` (all keys
    when ``first``) into ``counts`` (B, NBINS) int64, computing every tile; with ``keys``
    (first pass only) also store every tile's keys there ((B, keys_per_problem), -1 for
    dropped pairs)."""
    batch, n, d = P.a.shape
    t_work, t_key = _tl_types(P)
    store = keys is not None
    _tile_hist_kernel[(batch, P.workers)](
        P.a, P.b, P.norm_a, P.norm_b, prefix, counts, keys if store else counts, n,
        P.b.shape[1], d, P.tiles_j, P.n_tiles, P.workers, shift,
        P.keys_per_problem if store else 0,
        PAIRWISE=P.pairwise, FIRST=first, STORE=store, T=t_work, KEY=t_key, BT=BT, BK=P.bk,
        DIGIT=DIGIT, NBINS=NBINS, num_warps=TILE_WARPS,
    )


def stored_pass(P: Problem, keys, counts, prefix, shift: int) -> None:
    """tile_pass (not first) over the keys the first pass stored."""
    _, t_key = _tl_types(P)
    _stored_hist_kernel[(P.a.shape[0], P.stored_workers)](
        keys, prefix, counts, P.keys_per_problem, P.stored_workers, shift, P.keys_per_problem,
        KEY=t_key, DIGIT=DIGIT, NBINS=NBINS, BLOCK=SBLOCK, num_warps=STORED_WARPS,
    )


def select(P: Problem, counts, prefix, rank, out, final: bool, squared: bool) -> None:
    """Fix the next digit of every problem's prefix from ``counts`` (then cleared); ``final``:
    write the scaled-back results into ``out`` (B,) in the work dtype."""
    t_work, t_key = _tl_types(P)
    _select_kernel[(P.a.shape[0],)](
        counts, prefix, rank, P.exponent, P.check, out, FINAL=final, SQUARED=squared, T=t_work,
        KEY=t_key, DIGIT=DIGIT, NBINS=NBINS,
    )


@register("triton", "median_pairwise_distance")
def median_pairwise_distance(x, y, squared: bool, memory_budget: int):
    """x: (B, N, d); y: (B, M, d) or None. Returns the (B,) lower medians in x's dtype."""
    batch = x.shape[0]
    device = x.device
    work = acc_dtype(x.dtype)
    # The kernel writes the work dtype; torch rounds half-precision results (the interpreter
    # truncates float32 -> bfloat16 where the GPU rounds to nearest even).
    out = torch.empty(batch, dtype=work, device=device)
    if batch == 0:
        return out.to(x.dtype)
    P = prepare(x, y)
    keys = None
    if P.keys_bytes() <= memory_budget // KEYS_SHARE:
        keys = torch.empty((batch, P.keys_per_problem), dtype=P.key_dtype, device=device)
    counts = torch.zeros((batch, NBINS), dtype=torch.int64, device=device)
    prefix = torch.zeros(batch, dtype=torch.int64, device=device)
    rank = torch.full((batch,), (P.n_pairs - 1) // 2, dtype=torch.int64, device=device)
    passes = shifts(work)
    for p, shift in enumerate(passes):
        if p == 0:
            tile_pass(P, counts, prefix, shift, True, keys)
        elif keys is None:
            tile_pass(P, counts, prefix, shift, False)
        else:
            stored_pass(P, keys, counts, prefix, shift)
        select(P, counts, prefix, rank, out, p == len(passes) - 1, bool(squared))
    return out if out.dtype == x.dtype else out.to(x.dtype)
