"""The Triton kernels (nats_kernels/triton): the pieces the parametrized op suites do not reach --
the multi-tensor plan (launches of up to SLOTS tensors, CHUNK-element programs, chunks of one
tensor and tensors of one launch side by side), the layouts the kernels take natively and the
contiguous-copy fallback, which inputs ``safe_inputs`` copies, the grouped passes of
cfg_accumulate's list form, determinism, and the custom ops' opcheck on this backend. Aliased and
overlapping operands are tested on every backend in tests/test_aliasing.py.

Runs where the triton backend runs: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (the
default ``pytest`` run gets there through tests/test_triton_interpret.py, in a subprocess).
The oracle is the library's reference on float64 copies of the (already rounded) inputs, judged
with the one tolerance table of tests/helpers.py.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from helpers import DTYPES, assert_close, cfg_oracle, make, on_reference, same_bits
from listops import doubles, tensor_list

import nats_kernels as nk
from nats_kernels._validate import acc_dtype

AVAILABLE = nk.backends()["triton"]["available"]
pytestmark = pytest.mark.skipif(
    not AVAILABLE,
    reason="triton backend unavailable here (no CUDA, TRITON_INTERPRET unset); "
    "tests/test_triton_interpret.py runs this module under the interpreter",
)

if AVAILABLE:
    from nats_kernels.triton import _common
    from nats_kernels.triton._common import CHUNK, SLOTS, layout2d, plan
    from nats_kernels.triton.cfg import MAX_LIST
else:  # the module is skipped; names for collection only
    CHUNK, SLOTS, MAX_LIST = 8192, 16, 16

DEVICES = (["cuda"] if torch.cuda.is_available() else []) + (
    ["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("NATS_KERNELS_BACKEND", "triton")


# 55 tensors: tiny, 0-d and empty ones, one spanning three chunks and a bit, one chunk-sized
# and one a chunk plus one element: three launches of up to SLOTS non-empty tensors.
MANY = (
    [(), (1,), (7,), (0,), (59,), (3, 5), (2, 0, 3)] * 7
    + [(3 * CHUNK + 5,), (CHUNK,), (7,), (), (CHUNK + 1,), (97, 3)]
)


def test_many_shapes_cover_several_launches_and_chunks():
    """Guard for the tests below: the list really spans several launches, a tensor several
    chunks, and a launch both multi-chunk and single-chunk tensors."""
    a = [torch.empty(s) for s in MANY]
    p = plan([a, a], writes=False)
    assert len(p.groups) >= 3 and len(MANY) > 2 * SLOTS
    per_launch = [[math.ceil(n / CHUNK) for n in g.numels if n] for g in p.groups]
    assert max(max(c) for c in per_launch) == 4
    assert any(max(c) > 1 and min(c) == 1 for c in per_launch)
    assert p.chunks == sum(math.ceil(math.prod(s) / CHUNK) for s in MANY)


# ------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize(
    "make_views,expected",
    [
        (lambda: [torch.empty(4, 6), torch.empty(4, 6)], (24, True)),
        (lambda: [torch.empty(4, 12)[:, ::2], torch.empty(4, 6)], (24, False)),  # 1-d, stride 2
        (lambda: [torch.empty(6, 4).t(), torch.empty(4, 6)], (6, False)),  # 2-d
        (lambda: [torch.empty(()), torch.empty(())], (1, True)),
        (lambda: [torch.empty(1, 5, 1), torch.empty(5, 1, 1).view(1, 5, 1)], (5, True)),
        (lambda: [torch.empty(3, 2, 4).transpose(0, 1), torch.empty(2, 3, 4)], None),  # 3-d
        (lambda: [torch.empty(6, 1, 4).expand(6, 5, 4), torch.empty(6, 5, 4)], None),
    ],
    ids=["contiguous", "strided", "transposed", "0d", "size-1-dims", "transposed-3d", "expanded"],
)
def test_layout2d(make_views, expected):
    views = make_views()
    lay = layout2d(views)
    if expected is None:
        assert lay is None
        return
    cols, contiguous = expected
    assert lay.cols == cols and lay.contiguous == contiguous
    # The offsets the kernels compute visit exactly the logical elements, in order.
    for t, (so, si) in zip(views, lay.strides):
        base = torch.arange(t.untyped_storage().nbytes() // 4, dtype=torch.float32)
        v = base.as_strided(t.shape, t.stride(), t.storage_offset())
        i = torch.arange(t.numel())
        off = (i // lay.cols) * so + (i % lay.cols) * si + t.storage_offset()
        assert torch.equal(base[off], v.reshape(-1))


# ----------------------------------------------------------------------- list reductions


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_list_reductions_many_tensors(device, dtype):
    a = tensor_list(MANY, dtype, device, seed=1, layout="mixed", which=0)
    b = tensor_list(MANY, dtype, device, seed=2, layout="mixed", which=1)
    dots = nk.multi_dot(a, b)
    d64 = on_reference(nk.multi_dot, doubles(a), doubles(b))
    assert dots.dtype == acc_dtype(dtype)
    assert_close(dots, d64, acc_dtype(dtype), "multi_dot many tensors")
    r = nk.iga_ratio(a, b, eps=0.5)
    assert_close(r, d64[2] / (d64[0] + 0.5), acc_dtype(dtype), "iga_ratio many tensors")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_reductions_bit_identical_across_calls(device, dtype):
    a = tensor_list(MANY, dtype, device, seed=3, layout="mixed", which=0)
    b = tensor_list(MANY, dtype, device, seed=4, layout="mixed", which=2)
    real = make((3, 2 * CHUNK + 7), dtype, device, seed=5)[:, ::2]  # two chunks, strided
    fake = make((97, 211), dtype, device, seed=6).t()  # transposed

    def run():
        dots = nk.multi_dot(a, b)
        return [dots, nk.iga_ratio(a, b), *nk.aw_weights(dots, real, fake),
                *nk.aw_weights(dots.double(), real, fake, normalized=False)]

    first, second = run(), run()
    for k, (x, y) in enumerate(zip(first, second)):
        assert same_bits(x, y), f"result {k} differs between two calls"


def test_float32_sums_are_order_sensitive_enough_to_test():
    """Guard for the test above: float32 sums of this list depend on the order of the additions,
    so bit-identity across calls is a property of the fixed chunking, not a coincidence."""
    a = tensor_list(MANY, torch.float32, "cpu", seed=3, layout="contiguous")
    flat = torch.cat([t.flatten() for t in a]).double() ** 2
    assert flat.float().sum() != flat.flip(0).float().cumsum(0)[-1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_aw_weights_logits_across_chunks(device, dtype):
    real = (make((2 * CHUNK + 17,), dtype, device, seed=7) + 2.5).to(dtype)
    fake = make((2, 3 * CHUNK + 1), torch.float32, device, seed=8)[:, ::3]
    for d in ((2.7, 0.9, -0.8), (1.3, 0.45, 0.6)):
        for dots_dtype in (torch.float32, torch.float64):
            dots = torch.tensor(d, dtype=dots_dtype, device=device)
            got = nk.aw_weights(dots, real, fake)
            ref = on_reference(nk.aw_weights, dots.double(), real.double(), fake.double())
            assert int(got[2]) == int(ref[2]) == 3 + (d[2] > 0)
            assert_close(got[0], ref[0], dots_dtype, "w_r")
            assert_close(got[1], ref[1], dots_dtype, "w_f")


# ------------------------------------------------------------------------- list combines


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_list_combines_many_tensors(device, dtype):
    g_r = tensor_list(MANY, dtype, device, seed=10, layout="mixed", which=0)
    g_f = tensor_list(MANY, dtype, device, seed=11, layout="mixed", which=1)
    out = tensor_list(MANY, dtype, device, seed=12, layout="mixed", which=2)
    w_r = torch.tensor(0.625, device=device)
    expected = [0.625 * r - 1.5 * f for r, f in zip(doubles(g_r), doubles(g_f))]
    nk.aw_combine_(out, g_r, g_f, w_r, -1.5)
    for p, (o, e) in enumerate(zip(out, expected)):
        assert_close(o, e, dtype, f"aw_combine_ out[{p}]")
    expected = [x - 0.8 * y for x, y in zip(doubles(g_r), doubles(g_f))]
    nk.iga_correction_(g_r, g_f, torch.tensor(0.8, dtype=torch.float64, device=device))
    for p, (o, e) in enumerate(zip(g_r, expected)):
        assert_close(o, e, dtype, f"iga_correction_ g[{p}]")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layouts_beyond_2d_fall_back_to_contiguous_copies(device, dtype):
    """Views laid out in 3 dims and expanded inputs: read through contiguous copies; an output
    laid out so is computed contiguously and copied back; nothing outside the views is written."""
    shapes = [(3, 4, 5), (7,), (2, 3, 4)]
    buf = make((4, 3, 10), dtype, device, seed=20)
    out = [buf[..., ::2].transpose(0, 1), make((7,), dtype, device, seed=21),
           make((3, 2, 4), dtype, device, seed=22).transpose(0, 1)]
    g_r = [make((4, 3, 5), dtype, device, seed=23).transpose(0, 1),
           make((7,), dtype, device, seed=24), make((2, 1, 4), dtype, device, seed=25)
           .expand(2, 3, 4)]
    g_f = tensor_list(shapes, dtype, device, seed=26, layout="mixed")
    assert layout2d([out[0]]) is None and layout2d([out[2]]) is None  # written back
    assert layout2d([g_r[0]]) is None and layout2d([g_r[2]]) is None  # copied
    expected = [0.3 * r + 2.0 * f for r, f in zip(doubles(g_r), doubles(g_f))]
    ptrs = [o.data_ptr() for o in out]
    untouched = buf[..., 1::2].clone()
    nk.aw_combine_(out, g_r, g_f, 0.3, 2.0)
    for p, (o, e) in enumerate(zip(out, expected)):
        assert o.data_ptr() == ptrs[p]
        assert_close(o, e, dtype, f"out[{p}]")
    assert torch.equal(buf[..., 1::2], untouched), "wrote outside out[0]"
    d64 = on_reference(nk.multi_dot, doubles(g_r), doubles(g_f))
    assert_close(nk.multi_dot(g_r, g_f), d64, acc_dtype(dtype), "multi_dot > 2-d")


def test_safe_inputs_copies_only_hazards():
    flat = torch.zeros(20)
    out = [flat[0:5], flat[5:10], torch.zeros(3)]
    same = [flat[0:5], flat[10:15], torch.zeros(3)]  # identical view; disjoint; other storage
    assert all(x is y for x, y in zip(_common.safe_inputs(out, same), same))
    risky = [flat[5:10], flat[1:6], out[2]]  # another position; shifted overlap; identical
    got = _common.safe_inputs(out, risky)
    assert got[0] is not risky[0] and got[1] is not risky[1] and got[2] is risky[2]
    assert all(torch.equal(x, y) for x, y in zip(got, risky))


# ---------------------------------------------------------------------------------- cfg


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cfg_list_longer_than_one_launch(device, dtype):
    """M > MAX_LIST: passes through a float32/float64 scratch; the additions are the stacked
    kernel's, in the same order, so both forms give the same bits."""
    M = 2 * MAX_LIST + 3
    x0 = make((5, 59), dtype, device, seed=40, noncontiguous=True)
    stacked = make((M, 5, 59), dtype, device, seed=41)
    weights = make((M,), torch.float64, device, seed=42)
    scale = make((M, 5), torch.float32, device, seed=43)
    listed = nk.cfg_accumulate(x0, list(stacked), weights, eta=0.7, scale=scale)
    assert_close(listed, cfg_oracle(x0, stacked, weights, 0.7, scale), dtype,
                 "list form, M > MAX_LIST")
    assert same_bits(listed, nk.cfg_accumulate(x0, stacked, weights, eta=0.7, scale=scale))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_cfg_rows_cross_blocks(device, dtype, layout):
    """Samples of 1500 elements (rows straddle the 1024-element program blocks) with a
    per-sample scale; stacked and list forms and cfg_step_."""
    M, shape = 3, (3, 30, 50)
    if layout == "contiguous":
        x0 = make(shape, dtype, device, seed=44)
        stacked = make((M, *shape), dtype, device, seed=45)
    else:
        x0 = make((3, 50, 30), dtype, device, seed=44).transpose(1, 2)
        stacked = make((M, 3, 50, 30), dtype, device, seed=45).transpose(2, 3)
    weights = make((M,), torch.float32, device, seed=46)
    scale = make((M, 3), torch.float64, device, seed=47)
    expected = cfg_oracle(x0, list(stacked), weights, 1.5, scale)
    assert_close(nk.cfg_accumulate(x0, stacked, weights, eta=1.5, scale=scale), expected,
                 dtype, "stacked")
    assert_close(nk.cfg_accumulate(x0, list(stacked), weights, eta=1.5, scale=scale), expected,
                 dtype, "list")
    x = x0.clone()
    nk.cfg_step_(x, stacked[1], weights[1], eta=1.5, scale=scale[1])
    step = on_reference(nk.cfg_step_, x0.double().clone(), stacked[1].double(),
                        weights[1].double(), eta=1.5, scale=scale[1].double())
    assert_close(x, step, dtype, "cfg_step_")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cfg_layouts_beyond_2d(device, dtype):
    """out, x0 and a gradient laid out in 3 dims, an expanded gradient: contiguous copies in, the
    result copied back into ``out``."""
    shape = (4, 6, 5)
    x0 = make((6, 4, 5), dtype, device, seed=50).transpose(0, 1)
    grads = [make((6, 4, 5), dtype, device, seed=51).transpose(0, 1),
             make((4, 1, 5), dtype, device, seed=52).expand(shape),
             make(shape, dtype, device, seed=53)]
    weights = torch.tensor([0.5, -1.0, 2.0], device=device)
    scale = make((3, 4), torch.float32, device, seed=54)
    out = torch.empty((6, 4, 5), dtype=dtype, device=device).transpose(0, 1)
    assert layout2d([out]) is None
    result = nk.cfg_accumulate(x0, grads, weights, eta=0.3, scale=scale, out=out)
    assert result is out
    assert_close(out, cfg_oracle(x0, grads, weights, 0.3, scale), dtype, "3-d")
    x = x0.clone().transpose(0, 1).contiguous().transpose(0, 1)
    assert layout2d([x]) is None
    nk.cfg_step_(x, grads[0], 0.25, eta=2.0)
    assert_close(x, x0.double() + 0.5 * grads[0].double(), dtype, "cfg_step_ 3-d")


# ------------------------------------------------------------------------------ opcheck


def _opcheck_cases(device):
    x = make((4, 3), torch.float32, device)
    g = make((2, 4, 3), torch.float32, device, seed=1)
    a = [make((5,), torch.float32, device, seed=2), make((3, 2), torch.float32, device, seed=3).t()]
    b = [make((5,), torch.float32, device, seed=4), make((2, 3), torch.float32, device, seed=5)]
    ops = torch.ops.nats_kernels

    def t(v):
        return torch.tensor(v, device=device)

    return {
        "cfg_accumulate": (ops.cfg_accumulate.default,
                           (x, g, t([1.0, 0.5]), 0.5, torch.ones(2, 4, device=device),
                            torch.empty(4, 3, device=device))),
        "cfg_accumulate_list": (ops.cfg_accumulate_list.default,
                                (x, list(g), t([1.0, 0.5]), 0.5, None,
                                 torch.empty(4, 3, device=device))),
        "cfg_step_": (ops.cfg_step_.default, (x.clone(), g[0], t(0.5), 1.0, None)),
        "multi_dot": (ops.multi_dot.default, (a, b)),
        "aw_weights": (ops.aw_weights.default,
                       (t([2.0, 3.0, -1.0]), make((6,), torch.float32, device),
                        make((6,), torch.float32, device, seed=1), True, 0.5, 0.75, 0.05, 0.05)),
        "aw_combine_": (ops.aw_combine_.default,
                        ([u.clone() for u in a], a, b, t(0.3), t(0.7))),
        "iga_ratio": (ops.iga_ratio.default, (a, b, 1e-12)),
        "iga_correction_": (ops.iga_correction_.default,
                            ([u.clone() for u in a], b, t(0.4))),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["cfg_accumulate", "cfg_accumulate_list", "cfg_step_",
                                  "multi_dot", "aw_weights", "aw_combine_", "iga_ratio",
                                  "iga_correction_"])
def test_opcheck_on_triton(device, name):
    from nats_kernels import _dispatch

    assert _dispatch.backend_name(name, device) == "triton"
    op, args = _opcheck_cases(device)[name]
    torch.library.opcheck(op, args)
