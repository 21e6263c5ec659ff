"""multi_dot (design §4, aw-loss: the three inner products of the real and fake gradients)
against a float64 oracle written here, on every backend that implements it; and its bad inputs,
rejected before dispatch.

The oracle upcasts the same, already rounded inputs to float64; nothing here calls the library's
reference functions.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DTYPES, PROPERTY, TOL, assert_close, bad_inputs_test, cases
from hypothesis import given
from hypothesis import strategies as st
from listops import (
    LAYOUTS,
    SHAPE_LISTS,
    assert_unchanged,
    huge_among_tiny,
    snapshot,
    tensor_list,
)
from listops import zeros as _t

import nats_kernels as nk
from nats_kernels._validate import acc_dtype

pytestmark = pytest.mark.single_thread


def oracle_dots(a, b) -> torch.Tensor:
    """(<a,a>, <b,b>, <a,b>) in float64."""
    aa = bb = ab = torch.zeros((), dtype=torch.float64)
    for x, y in zip(a, b):
        x = x.double().flatten()
        y = y.double().flatten()
        aa = aa + (x * x).sum()
        bb = bb + (y * y).sum()
        ab = ab + (x * y).sum()
    return torch.stack((aa, bb, ab))


@pytest.mark.parametrize("device,backend", cases("multi_dot"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SHAPE_LISTS.values(), ids=SHAPE_LISTS.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_multi_dot_matches_oracle(device, backend, dtype, shapes, layout):
    a = tensor_list(shapes, dtype, device, seed=1, layout=layout, which=0)
    b = tensor_list(shapes, dtype, device, seed=2, layout=layout, which=1)
    a0, b0 = snapshot(a), snapshot(b)
    got = nk.multi_dot(a, b)
    assert got.shape == (3,) and got.device.type == device
    assert_close(got, oracle_dots(a, b), acc_dtype(dtype), "multi_dot")
    assert_unchanged(a, a0, "a")
    assert_unchanged(b, b0, "b")


@pytest.mark.parametrize("device,backend", cases("multi_dot"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_dot_threaded(device, backend, dtype, threads):
    threads()
    a, b = huge_among_tiny(dtype, device, seeds=(6, 7), which=(0, 2))
    assert_close(nk.multi_dot(a, b), oracle_dots(a, b), acc_dtype(dtype), "multi_dot threaded")


@pytest.mark.parametrize("device,backend", cases("multi_dot"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_dot_same_list_and_tuples(device, backend, dtype):
    a = tensor_list(SHAPE_LISTS["0d-and-empty"], dtype, device, seed=3, layout="mixed")
    got = nk.multi_dot(tuple(a), a)
    d = oracle_dots(a, a)
    assert_close(got, torch.stack((d[0], d[0], d[0])), acc_dtype(dtype), "multi_dot(a, a)")


@pytest.mark.parametrize("device,backend", cases("multi_dot"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_multi_dot_half_inputs_do_not_overflow(device, backend, dtype):
    """Squares of half values far beyond float16's range (65504) accumulate in float32."""
    a = tensor_list([(1025,), (97, 7)], dtype, device, seed=4, layout="contiguous", scale=300.0)
    b = tensor_list([(1025,), (97, 7)], dtype, device, seed=5, layout="strided", scale=300.0)
    got = nk.multi_dot(a, b)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    expected = oracle_dots(a, b)
    assert expected[0] > 1e7
    assert_close(got, expected, torch.float32, "multi_dot half large")


@pytest.mark.parametrize("device,backend", cases("multi_dot"))
def test_multi_dot_zero_size_only_gives_zeros(device, backend):
    a = [torch.empty(0, device=device), torch.empty(3, 0, device=device)]
    got = nk.multi_dot(a, [t.clone() for t in a])
    assert torch.equal(got, torch.zeros(3, device=device))


@pytest.mark.parametrize("device,backend", cases("multi_dot"))
def test_multi_dot_nan_inf_propagate(device, backend):
    a = [torch.ones(5, device=device), torch.ones(3, device=device)]
    b = [torch.ones(5, device=device), torch.ones(3, device=device)]
    a[1][2] = math.nan
    got = nk.multi_dot(a, b)
    assert got[0].isnan() and got[2].isnan() and got[1] == 8
    a[1][2] = math.inf
    b[0][0] = -1
    got = nk.multi_dot(a, b)
    assert got[0] == math.inf and got[2] == math.inf and got[1] == 8


@pytest.mark.parametrize("device,backend", cases("multi_dot"))
@PROPERTY
@given(
    shapes=st.lists(
        st.sampled_from([(), (0,), (1,), (7,), (59,), (3, 5), (2, 0, 3), (97, 2)]),
        min_size=1, max_size=6,
    ),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_multi_dot_properties(device, backend, shapes, dtype, layout, seed):
    a = tensor_list(shapes, dtype, device, seed=seed, layout=layout, which=0)
    b = tensor_list(shapes, dtype, device, seed=seed + 1, layout=layout, which=1)
    ab = nk.multi_dot(a, b)
    ba = nk.multi_dot(b, a)
    result = acc_dtype(dtype)
    assert ab.dtype == ba.dtype == result
    # Symmetry: swapping the lists swaps the two squared norms and keeps the cross term.
    assert_close(ba, ab[[1, 0, 2]], result, "symmetry")
    # Squared norms are sums of squares.
    assert (ab[:2] >= 0).all()
    # Cauchy–Schwarz, up to the rounding of the three sums.
    rtol = TOL[result]["rtol"]
    assert ab[2].double() ** 2 <= ab[0].double() * ab[1].double() * (1 + 4 * rtol) + 1e-30


# ----------------------------------------------------------------------------------- bad inputs


MULTI_DOT_ERRORS = {
    "a-tensor": (lambda: nk.multi_dot(_t(3), [_t(3)]), TypeError,
                 r"^a must be a list or tuple of tensors, got Tensor"),
    "b-tensor": (lambda: nk.multi_dot([_t(3)], _t(3)), TypeError, r"^b must be a list or tuple"),
    "a-not-a-sequence": (lambda: nk.multi_dot(iter([_t(3)]), [_t(3)]), TypeError,
                         r"^a must be a list or tuple"),
    "a-empty": (lambda: nk.multi_dot([], []), ValueError, r"^a must hold at least 1 tensor"),
    "b-empty": (lambda: nk.multi_dot([_t(3)], []), ValueError,
                r"^b must hold at least 1 tensor"),
    "lengths": (lambda: nk.multi_dot([_t(3), _t(2)], [_t(3)]), ValueError,
                r"^b has 1 tensors but a has 2"),
    "shape-b[1]": (lambda: nk.multi_dot([_t(3), _t(2, 2)], [_t(3), _t(4)]), ValueError,
                   r"^b\[1\] has shape \(4,\) but a\[1\] has \(2, 2\)"),
    "shape-transposed": (lambda: nk.multi_dot([_t(2, 3)], [_t(3, 2)]), ValueError, r"^b\[0\]"),
    "int-a[1]": (lambda: nk.multi_dot([_t(3), _t(2, dtype=torch.int64)], [_t(3), _t(2)]),
                 TypeError, r"^a\[1\] must have a floating dtype.*got torch.int64"),
    "bool-b[0]": (lambda: nk.multi_dot([_t(3)], [_t(3, dtype=torch.bool)]), TypeError,
                  r"^b\[0\] must have a floating dtype"),
    "complex": (lambda: nk.multi_dot([_t(3, dtype=torch.complex64)], [_t(3)]), TypeError,
                r"^a\[0\] must have a floating dtype"),
    "mixed-b[0]": (lambda: nk.multi_dot([_t(3)], [_t(3, dtype=torch.float64)]), TypeError,
                   r"^b\[0\] has dtype torch.float64, expected torch.float32"),
    "mixed-a[1]": (lambda: nk.multi_dot([_t(3), _t(1, dtype=torch.float16)], [_t(3), _t(1)]),
                   TypeError, r"^a\[1\] has dtype torch.float16"),
    "not-a-tensor-a[1]": (lambda: nk.multi_dot([_t(3), 1.0], [_t(3), _t(1)]), TypeError,
                          r"^a\[1\] must be a torch.Tensor, got float"),
}


# Rejections made by multi_dot's input checks, before any backend is chosen
# (raises_before_dispatch fails otherwise): one test per case, not one per backend.
test_multi_dot_bad_inputs = bad_inputs_test(MULTI_DOT_ERRORS)
