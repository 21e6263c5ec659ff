"""aw_combine_ (design §4, aw-loss: out = w_r g_r + w_f g_f) against a float64 oracle written here,
on every backend that implements it: layouts, kinds of weights, out being g_r or g_f, views of one
flat buffer, linearity in the weights; and its bad inputs, rejected before dispatch.
(tests/test_aliasing.py: out aliasing an input at another position.)

The oracle upcasts the same, already rounded inputs to float64; nothing here calls the library's
reference functions.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    DTYPES,
    PROPERTY,
    TOL,
    assert_close,
    bad_inputs_test,
    cases,
    make,
    raises_before_dispatch,
)
from hypothesis import given
from hypothesis import strategies as st
from listops import (
    LAYOUTS,
    SHAPE_LISTS,
    assert_unchanged,
    assert_wrote_only_the_views,
    huge_among_tiny,
    snapshot,
    strided_views,
    tensor_list,
    value,
)
from listops import zeros as _t

import nats_kernels as nk
from nats_kernels._validate import acc_dtype

pytestmark = pytest.mark.single_thread


WEIGHT_KINDS = {
    "python-float": lambda w, device, dtype: w,
    "0d-acc": lambda w, device, dtype: torch.tensor(w, dtype=acc_dtype(dtype), device=device),
    "0d-float64": lambda w, device, dtype: torch.tensor(w, dtype=torch.float64, device=device),
    "0d-float16": lambda w, device, dtype: torch.tensor(w, dtype=torch.float16, device=device),
}


def oracle_combine(g_r, g_f, w_r, w_f):
    return [value(w_r) * r.double() + value(w_f) * f.double() for r, f in zip(g_r, g_f)]


@pytest.mark.parametrize("device,backend", cases("aw_combine_"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SHAPE_LISTS.values(), ids=SHAPE_LISTS.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_aw_combine_matches_oracle(device, backend, dtype, shapes, layout):
    g_r = tensor_list(shapes, dtype, device, seed=11, layout=layout, which=0)
    g_f = tensor_list(shapes, dtype, device, seed=12, layout=layout, which=1)
    if layout == "contiguous":
        out, bufs = [torch.full(s, 7.0, dtype=dtype, device=device) for s in shapes], None
    else:
        out, bufs = strided_views(shapes, dtype, device, seed=13)
    before_r, before_f = snapshot(g_r), snapshot(g_f)
    before_bufs = snapshot(bufs) if bufs else None
    ptrs = [o.data_ptr() for o in out]
    w_r, w_f = 0.8125, torch.tensor(-1.37, dtype=acc_dtype(dtype), device=device)
    expected = oracle_combine(g_r, g_f, w_r, w_f)
    assert nk.aw_combine_(out, g_r, g_f, w_r, w_f) is None
    for p, (o, e) in enumerate(zip(out, expected)):
        assert o.data_ptr() == ptrs[p] and o.dtype == dtype
        assert_close(o, e, dtype, f"aw_combine_ out[{p}]")
    assert_unchanged(g_r, before_r, "g_r")
    assert_unchanged(g_f, before_f, "g_f")
    if bufs:
        assert_wrote_only_the_views(bufs, before_bufs, shapes, "out")


@pytest.mark.parametrize("device,backend", cases("aw_combine_"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alias", ["fresh", "out-is-g_r", "out-is-g_f"])
@pytest.mark.parametrize("w_kind", WEIGHT_KINDS.values(), ids=WEIGHT_KINDS.keys())
def test_aw_combine_aliasing_and_weight_kinds(device, backend, dtype, alias, w_kind):
    shapes = SHAPE_LISTS["0d-and-empty"]
    g_r = tensor_list(shapes, dtype, device, seed=21, layout="mixed", which=0)
    g_f = tensor_list(shapes, dtype, device, seed=22, layout="mixed", which=2)
    w_r, w_f = w_kind(0.3, device, dtype), w_kind(-2.25, device, dtype)
    w_r0, w_f0 = (w.clone() if isinstance(w, torch.Tensor) else w for w in (w_r, w_f))
    expected = oracle_combine(g_r, g_f, w_r, w_f)
    before_r, before_f = snapshot(g_r), snapshot(g_f)
    out = {"fresh": [torch.empty_like(t) for t in g_r], "out-is-g_r": g_r, "out-is-g_f": g_f}[alias]
    assert nk.aw_combine_(out, g_r, g_f, w_r, w_f) is None
    for p, (o, e) in enumerate(zip(out, expected)):
        assert_close(o, e, dtype, f"aw_combine_ {alias} out[{p}]")
    if alias != "out-is-g_r":
        assert_unchanged(g_r, before_r, "g_r")
    if alias != "out-is-g_f":
        assert_unchanged(g_f, before_f, "g_f")
    for w, w0 in ((w_r, w_r0), (w_f, w_f0)):
        if isinstance(w, torch.Tensor):
            assert torch.equal(w, w0)


@pytest.mark.parametrize("device,backend", cases("aw_combine_"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alias", ["fresh", "out-is-g_r"])
def test_aw_combine_threaded(device, backend, dtype, alias, threads):
    threads()
    g_r, g_f, fresh = huge_among_tiny(dtype, device, seeds=(8, 9, 10), which=(1, 2, 0))
    out = g_r if alias == "out-is-g_r" else fresh
    w_r = torch.tensor(0.625, device=device)
    expected = oracle_combine(g_r, g_f, w_r, -1.5)
    nk.aw_combine_(out, g_r, g_f, w_r, -1.5)
    for p, (o, e) in enumerate(zip(out, expected)):
        assert_close(o, e, dtype, f"aw_combine_ threaded out[{p}]")


@pytest.mark.parametrize("device,backend", cases("aw_combine_"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_aw_combine_into_one_flat_buffer(device, backend, dtype):
    """out as views of one flat gradient buffer (as in bucketed/flattened gradients), g_r as
    views of another; the op writes each view and nothing past the last one."""
    shapes = [(7, 5), (), (59,), (0,), (3, 1, 2)]
    sizes = [math.prod(s) for s in shapes]
    flat_out = make((sum(sizes) + 3,), dtype, device, seed=31)
    flat_r = make((sum(sizes),), dtype, device, seed=32)
    out, g_r, start = [], [], 0
    for s, n in zip(shapes, sizes):
        out.append(flat_out[start:start + n].view(s))
        g_r.append(flat_r[start:start + n].view(s))
        start += n
    g_f = tensor_list(shapes, dtype, device, seed=33, layout="strided")
    tail = flat_out[-3:].clone()
    expected = oracle_combine(g_r, g_f, -0.5, 3)
    nk.aw_combine_(out, g_r, g_f, -0.5, 3)
    for p, (o, e) in enumerate(zip(out, expected)):
        assert_close(o, e, dtype, f"flat out[{p}]")
    assert torch.equal(flat_out[-3:], tail)


@pytest.mark.parametrize("device,backend", cases("aw_combine_"))
def test_aw_combine_nan_inf_propagate(device, backend):
    g_r = [torch.tensor([1.0, math.nan, 2.0, math.inf], device=device)]
    g_f = [torch.tensor([1.0, 1.0, -math.inf, 1.0], device=device)]
    out = [torch.zeros(4, device=device)]
    expected = oracle_combine(g_r, g_f, 0.0, 2.0)  # 0 * inf = nan, as in PyTorch
    nk.aw_combine_(out, g_r, g_f, 0.0, 2.0)
    assert_close(out[0], expected[0], torch.float32, "nan/inf")
    assert out[0][1].isnan() and out[0][3].isnan() and out[0][2] == -math.inf


@pytest.mark.parametrize("device,backend", cases("aw_combine_"))
@PROPERTY
@given(
    shapes=st.lists(st.sampled_from([(), (0,), (1,), (7,), (59,), (3, 5), (97, 2)]),
                    min_size=1, max_size=5),
    dtype=st.sampled_from(DTYPES),
    w_r=st.floats(-4, 4),
    w_f=st.floats(-4, 4),
    c=st.sampled_from([-2.0, -1.0, 0.5, 2.0, 4.0]),
    seed=st.integers(0, 2**16),
)
def test_aw_combine_linear_in_weights(device, backend, shapes, dtype, w_r, w_f, c, seed):
    """combine(w_r, w_f) = combine(w_r, 0) + combine(0, w_f) and combine(c w_r, c w_f) =
    c combine(w_r, w_f), up to one rounding of each result."""
    g_r = tensor_list(shapes, dtype, device, seed=seed, layout="mixed", which=0)
    g_f = tensor_list(shapes, dtype, device, seed=seed + 1, layout="mixed", which=1)

    def combine(a, b):
        out = [torch.empty_like(t) for t in g_r]
        nk.aw_combine_(out, g_r, g_f, a, b)
        return [o.double() for o in out]

    full, only_r, only_f, scaled = (combine(w_r, w_f), combine(w_r, 0.0), combine(0.0, w_f),
                                    combine(c * w_r, c * w_f))
    rtol, atol = TOL[dtype]["rtol"], TOL[dtype]["atol"]
    for p, (r, f) in enumerate(zip(g_r, g_f)):
        magnitude = (abs(w_r) * r.double().abs() + abs(w_f) * f.double().abs())
        bound = 2 * rtol * magnitude + atol
        assert ((full[p] - (only_r[p] + only_f[p])).abs() <= bound).all(), f"additivity [{p}]"
        assert ((scaled[p] - c * full[p]).abs() <= abs(c) * bound).all(), f"homogeneity [{p}]"


# ----------------------------------------------------------------------------------- bad inputs


AW_COMBINE_ERRORS = {
    "out-tensor": (lambda: nk.aw_combine_(_t(3), [_t(3)], [_t(3)], 1.0, 1.0), TypeError,
                   r"^out must be a list or tuple"),
    "g_r-tensor": (lambda: nk.aw_combine_([_t(3)], _t(3), [_t(3)], 1.0, 1.0), TypeError,
                   r"^g_r must be a list or tuple"),
    "g_f-tensor": (lambda: nk.aw_combine_([_t(3)], [_t(3)], _t(3), 1.0, 1.0), TypeError,
                   r"^g_f must be a list or tuple"),
    "out-empty": (lambda: nk.aw_combine_([], [], [], 1.0, 1.0), ValueError,
                  r"^out must hold at least 1"),
    "g_f-empty": (lambda: nk.aw_combine_([_t(3)], [_t(3)], [], 1.0, 1.0), ValueError,
                  r"^g_f must hold at least 1"),
    "lengths": (lambda: nk.aw_combine_([_t(3), _t(2)], [_t(3), _t(2)], [_t(3)], 1.0, 1.0),
                ValueError, r"^g_f has 1 tensors but out has 2"),
    "shape-g_f[1]": (lambda: nk.aw_combine_([_t(3), _t(2)], [_t(3), _t(2)], [_t(3), _t(1, 2)],
                                            1.0, 1.0),
                     ValueError, r"^g_f\[1\] has shape \(1, 2\) but out\[1\] has \(2,\)"),
    "shape-g_r[0]": (lambda: nk.aw_combine_([_t(3)], [_t()], [_t(3)], 1.0, 1.0), ValueError,
                     r"^g_r\[0\] has shape \(\) but out\[0\] has \(3,\)"),
    "int-out": (lambda: nk.aw_combine_([_t(3, dtype=torch.int32)], [_t(3)], [_t(3)], 1.0, 1.0),
                TypeError, r"^out\[0\] must have a floating dtype"),
    "mixed-g_r[0]": (lambda: nk.aw_combine_([_t(3)], [_t(3, dtype=torch.float64)], [_t(3)],
                                            1.0, 1.0),
                     TypeError, r"^g_r\[0\] has dtype torch.float64, expected torch.float32"),
    "mixed-g_f[1]": (lambda: nk.aw_combine_([_t(3), _t(2)], [_t(3), _t(2)],
                                            [_t(3), _t(2, dtype=torch.bfloat16)], 1.0, 1.0),
                     TypeError, r"^g_f\[1\] has dtype torch.bfloat16"),
    "w_r-(1,)": (lambda: nk.aw_combine_([_t(3)], [_t(3)], [_t(3)], _t(1), 1.0), ValueError,
                 r"^w_r must be a number or a 0-d tensor, got shape \(1,\)"),
    "w_f-(3,)": (lambda: nk.aw_combine_([_t(3)], [_t(3)], [_t(3)], 1.0, _t(3)), ValueError,
                 r"^w_f must be a number or a 0-d tensor, got shape \(3,\)"),
    "w_r-int-tensor": (lambda: nk.aw_combine_([_t(3)], [_t(3)], [_t(3)],
                                              torch.tensor(1), 1.0),
                       TypeError, r"^w_r must have a floating dtype"),
    "w_f-None": (lambda: nk.aw_combine_([_t(3)], [_t(3)], [_t(3)], 1.0, None), TypeError,
                 r"^w_f must be a Python number, got NoneType"),
    "w_r-str": (lambda: nk.aw_combine_([_t(3)], [_t(3)], [_t(3)], "1", 1.0), TypeError,
                r"^w_r must be a Python number, got str"),
    "w_r-bool": (lambda: nk.aw_combine_([_t(3)], [_t(3)], [_t(3)], True, 1.0), TypeError,
                 r"^w_r must be a Python number, got bool"),
    "out[0]-expanded": (lambda: nk.aw_combine_([_t(1, 4).expand(3, 4)], [_t(3, 4)], [_t(3, 4)],
                                               1.0, 1.0),
                        ValueError, r"^out\[0\] is written in place but has overlapping memory"),
    "out[1]-expanded": (lambda: nk.aw_combine_([_t(2), _t(1).expand(5)], [_t(2), _t(5)],
                                               [_t(2), _t(5)], 1.0, 1.0),
                        ValueError, r"^out\[1\] is written in place but has overlapping memory"),
}


# These rejections are made by the public functions' input checks, before any backend is chosen
# (raises_before_dispatch fails otherwise): one test per case, not one per backend.


# Rejections made by aw_combine_'s input checks, before any backend is chosen
# (raises_before_dispatch fails otherwise): one test per case, not one per backend.
test_aw_combine_bad_inputs = bad_inputs_test(AW_COMBINE_ERRORS)


def test_aw_combine_error_writes_nothing():
    """Validation finishes before the first write: an error at the last position leaves
    every ``out`` tensor as it was (no kernel runs: raises_before_dispatch)."""
    out = [torch.full((3,), 5.0), torch.full((2,), 5.0), torch.full((1,), 5.0)]
    g = [torch.ones(3), torch.ones(2), torch.ones(1)]
    for bad in ([torch.ones(3), torch.ones(2), torch.ones(2)], _t(1)):
        with raises_before_dispatch(ValueError):
            if isinstance(bad, list):
                nk.aw_combine_(out, g, bad, 1.0, 1.0)
            else:
                nk.aw_combine_(out, g, g, 1.0, bad)
        assert all((o == 5).all() for o in out)
