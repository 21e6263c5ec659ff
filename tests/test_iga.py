"""iga_ratio, iga_correction_ (design §5, BRC / IGA) against float64 oracles written here, on every
backend that implements them; the two traced by torch.compile into one graph; and their bad
inputs, rejected before dispatch. (tests/test_iga_on_tiny_gans.py: the sanity properties of
design §5 on tiny GANs; tests/test_aliasing.py: g_G aliasing gf_G at another position.)

Every oracle upcasts the same, already rounded inputs to float64; nothing here calls the library's
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
from hypothesis import assume, given
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


def oracle_ratio(gf, gF, eps) -> torch.Tensor:
    """<gf, gF> / (<gf, gf> + eps) in float64."""
    num = den = torch.zeros((), dtype=torch.float64)
    for x, y in zip(gf, gF):
        x = x.double().flatten()
        num = num + (x * y.double().flatten()).sum()
        den = den + (x * x).sum()
    return num / (den + eps)


def oracle_correction(g, gf, r):
    return [x.double() - value(r) * y.double() for x, y in zip(g, gf)]


# ------------------------------------------------------------------------------------ iga_ratio


@pytest.mark.parametrize("device,backend", cases("iga_ratio"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SHAPE_LISTS.values(), ids=SHAPE_LISTS.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_iga_ratio_matches_oracle(device, backend, dtype, shapes, layout):
    gf = tensor_list(shapes, dtype, device, seed=1, layout=layout, which=0)
    # gF partly along gf, so that r is O(1) and not a cancellation-dominated small number.
    gF = tensor_list(shapes, dtype, device, seed=2, layout=layout, which=1)
    for x, y in zip(gf, gF):
        y.copy_(0.7 * x.double() + 0.5 * y.double())  # keeps gF's layout
    before_f, before_F = snapshot(gf), snapshot(gF)
    r = nk.iga_ratio(gf, gF)
    assert r.shape == () and r.device.type == device
    assert_close(r, oracle_ratio(gf, gF, 1e-12), acc_dtype(dtype), "iga_ratio")
    assert_unchanged(gf, before_f, "gf_D")
    assert_unchanged(gF, before_F, "gF_D")


@pytest.mark.parametrize("device,backend", cases("iga_ratio"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_iga_ratio_threaded(device, backend, dtype, threads):
    threads()
    gf, gF = huge_among_tiny(dtype, device, seeds=(7, 8), which=(0, 2))
    for x, y in zip(gf, gF):
        y.copy_(-1.3 * x.double() + 0.5 * y.double())
    assert_close(nk.iga_ratio(gf, gF), oracle_ratio(gf, gF, 1e-12), acc_dtype(dtype), "threaded")


@pytest.mark.parametrize("device,backend", cases("iga_ratio"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [0.0, 1e-12, 1e-3, 2.5, 3])
def test_iga_ratio_eps(device, backend, dtype, eps):
    gf = tensor_list([(7, 5), (), (59,)], dtype, device, seed=3, layout="mixed", scale=0.05)
    gF = tensor_list([(7, 5), (), (59,)], dtype, device, seed=4, layout="mixed", which=1)
    r = nk.iga_ratio(gf, gF, eps=eps)
    assert r.dtype == acc_dtype(dtype)
    assert_close(r, oracle_ratio(gf, gF, eps), acc_dtype(dtype), f"iga_ratio eps={eps}")
    if eps == 1e-12:
        assert_close(nk.iga_ratio(gf, gF), r, acc_dtype(dtype), "default eps")


@pytest.mark.parametrize("device,backend", cases("iga_ratio"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_iga_ratio_zero_gradient(device, backend, dtype):
    """df/dD = 0: r = 0 / (0 + eps) = 0; with eps = 0 it is 0/0 = NaN, as the expression is."""
    gf = [torch.zeros(3, 4, dtype=dtype, device=device), torch.zeros((), dtype=dtype,
                                                                    device=device)]
    gF = tensor_list([(3, 4), ()], dtype, device, seed=5, layout="contiguous")
    assert nk.iga_ratio(gf, gF) == 0
    assert nk.iga_ratio(gf, gF, eps=0.0).isnan()
    empty = [torch.empty(0, dtype=dtype, device=device)]
    assert nk.iga_ratio(empty, [e.clone() for e in empty]) == 0


@pytest.mark.parametrize("device,backend", cases("iga_ratio"))
def test_iga_ratio_nan_inf_propagate(device, backend):
    gf = [torch.ones(4, device=device), torch.ones(2, device=device)]
    gF = [torch.ones(4, device=device), torch.ones(2, device=device)]
    gF[1][0] = math.nan
    assert nk.iga_ratio(gf, gF).isnan()
    gF[1][0] = math.inf
    assert nk.iga_ratio(gf, gF) == math.inf
    gf[0][0] = math.inf  # inf / inf
    assert nk.iga_ratio(gf, gF).isnan()


@pytest.mark.parametrize("device,backend", cases("iga_ratio"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_iga_ratio_half_inputs_do_not_overflow(device, backend, dtype):
    gf = tensor_list([(1025,), (97, 7)], dtype, device, seed=6, layout="strided", scale=300.0)
    gF = [(-2 * t.double()).to(dtype) for t in gf]
    r = nk.iga_ratio(gf, gF)
    assert r.dtype == torch.float32 and torch.isfinite(r)
    assert_close(r, oracle_ratio(gf, gF, 1e-12), torch.float32, "half large")


@pytest.mark.parametrize("device,backend", cases("iga_ratio"))
@PROPERTY
@given(
    shapes=st.lists(st.sampled_from([(), (0,), (1,), (7,), (59,), (3, 5), (97, 2)]),
                    min_size=1, max_size=5),
    dtype=st.sampled_from(DTYPES),
    k=st.integers(-3, 3),
    sign=st.sampled_from([-1.0, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_iga_ratio_scales_with_gF(device, backend, shapes, dtype, k, sign, seed):
    """r(gf, c gF) = c r(gf, gF). With c a signed power of two the scaled inputs are exact;
    the rare draws where float16 scaling would round into subnormals are rejected, since they
    change the input rather than the op."""
    gf = tensor_list(shapes, dtype, device, seed=seed, layout="mixed")
    gF = tensor_list(shapes, dtype, device, seed=seed + 1, layout="mixed", which=1)
    c = sign * 2.0**k
    scaled = [t * c for t in gF]
    assume(all(torch.equal(s.double(), t.double() * c) for s, t in zip(scaled, gF)))
    r = nk.iga_ratio(gf, gF)
    assert_close(nk.iga_ratio(gf, scaled), r.double() * c, acc_dtype(dtype), "scaling")


@pytest.mark.parametrize("device,backend", cases("iga_ratio"))
@PROPERTY
@given(
    shapes=st.lists(st.sampled_from([(), (1,), (7,), (59,), (3, 5)]), min_size=1, max_size=5),
    c=st.floats(-1e3, 1e3).filter(lambda c: abs(c) > 1e-3),
    seed=st.integers(0, 2**16),
)
def test_iga_ratio_scales_with_any_c_float64(device, backend, shapes, c, seed):
    """Any factor in float64: the result moves by c, up to the rounding of c * gF and of the
    sums, bounded by rtol * |c| * sum|gf gF| / <gf, gf>."""
    gf = tensor_list(shapes, torch.float64, device, seed=seed, layout="mixed")
    gF = tensor_list(shapes, torch.float64, device, seed=seed + 1, layout="mixed", which=1)
    r_c = nk.iga_ratio(gf, [t * c for t in gF], eps=0.0)
    r = nk.iga_ratio(gf, gF, eps=0.0)
    den = sum(float((x * x).sum()) for x in gf)
    mag = sum(float((x * y).abs().sum()) for x, y in zip(gf, gF))
    bound = 4 * TOL[torch.float64]["rtol"] * abs(c) * mag / den + TOL[torch.float64]["atol"]
    assert abs(float(r_c) - c * float(r)) <= bound


# ------------------------------------------------------------------------------ iga_correction_

R_KINDS = {
    "python-float": lambda r, device, dtype: r,
    "python-int": lambda r, device, dtype: int(round(r)) or 2,
    "0d-acc": lambda r, device, dtype: torch.tensor(r, dtype=acc_dtype(dtype), device=device),
    "0d-float64": lambda r, device, dtype: torch.tensor(r, dtype=torch.float64, device=device),
    "0d-bfloat16": lambda r, device, dtype: torch.tensor(r, dtype=torch.bfloat16, device=device),
}


@pytest.mark.parametrize("device,backend", cases("iga_correction_"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SHAPE_LISTS.values(), ids=SHAPE_LISTS.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_iga_correction_matches_oracle(device, backend, dtype, shapes, layout):
    gf = tensor_list(shapes, dtype, device, seed=11, layout=layout, which=1)
    if layout == "contiguous":
        g, bufs = tensor_list(shapes, dtype, device, seed=12, layout=layout), None
    else:
        g, bufs = strided_views(shapes, dtype, device, seed=12)
    before_gf = snapshot(gf)
    before_bufs = snapshot(bufs) if bufs else None
    ptrs = [t.data_ptr() for t in g]
    r = torch.tensor(-0.6180339, dtype=acc_dtype(dtype), device=device)
    expected = oracle_correction(g, gf, r)
    assert nk.iga_correction_(g, gf, r) is None
    for p, (t, e) in enumerate(zip(g, expected)):
        assert t.data_ptr() == ptrs[p] and t.dtype == dtype
        assert_close(t, e, dtype, f"iga_correction_ g_G[{p}]")
    assert_unchanged(gf, before_gf, "gf_G")
    assert r == torch.tensor(-0.6180339, dtype=acc_dtype(dtype))
    if bufs:
        assert_wrote_only_the_views(bufs, before_bufs, shapes, "g_G")


@pytest.mark.parametrize("device,backend", cases("iga_correction_"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r_kind", R_KINDS.values(), ids=R_KINDS.keys())
@pytest.mark.parametrize("r", [1.75, -3.0, 0.0])
def test_iga_correction_r_kinds(device, backend, dtype, r_kind, r):
    shapes = SHAPE_LISTS["0d-and-empty"]
    g = tensor_list(shapes, dtype, device, seed=21, layout="mixed")
    gf = tensor_list(shapes, dtype, device, seed=22, layout="mixed", which=2)
    r = r_kind(r, device, dtype)
    expected = oracle_correction(g, gf, r)
    iga_out = nk.iga_correction_(tuple(g), gf, r)
    assert iga_out is None
    for p, (t, e) in enumerate(zip(g, expected)):
        assert_close(t, e, dtype, f"g_G[{p}] r={r!r}")


@pytest.mark.parametrize("device,backend", cases("iga_correction_"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_iga_correction_threaded(device, backend, dtype, threads):
    threads()
    g, gf = huge_among_tiny(dtype, device, seeds=(25, 26), which=(1, 2))
    r = torch.tensor(0.8, dtype=torch.float64, device=device)
    expected = oracle_correction(g, gf, r)
    nk.iga_correction_(g, gf, r)
    for p, (t, e) in enumerate(zip(g, expected)):
        assert_close(t, e, dtype, f"threaded g_G[{p}]")


@pytest.mark.parametrize("device,backend", cases("iga_correction_"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_iga_correction_single_tensor(device, backend, dtype):
    for shape in [(), (1,), (1025,), (0,)]:
        g = [make(shape, dtype, device, seed=23)]
        gf = [make(shape, dtype, device, seed=24)]
        expected = oracle_correction(g, gf, 0.5)
        nk.iga_correction_(g, gf, 0.5)
        assert_close(g[0], expected[0], dtype, f"single {shape}")


@pytest.mark.parametrize("device,backend", cases("iga_correction_"))
def test_iga_correction_nan_inf_propagate(device, backend):
    g = [torch.tensor([1.0, math.nan, 2.0, math.inf, 1.0], device=device)]
    gf = [torch.tensor([math.inf, 1.0, 1.0, 1.0, 1.0], device=device)]
    expected = oracle_correction(g, gf, 0.0)  # 0 * inf = nan, as in PyTorch
    nk.iga_correction_(g, gf, 0.0)
    assert_close(g[0], expected[0], torch.float32, "nan/inf")
    assert g[0][0].isnan() and g[0][1].isnan() and g[0][3] == math.inf
    g = [torch.ones(2, device=device)]
    nk.iga_correction_(g, [torch.ones(2, device=device)], torch.tensor(math.nan))
    assert g[0].isnan().all()


# ----------------------------------------------------------------------- torch.compile, no sync


# torch.compile itself warns that torch.jit.script_method is deprecated (torch internals).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("device,backend", cases("iga_ratio", "iga_correction_"))
def test_iga_step_compiles_fullgraph(device, backend):
    """iga_ratio + iga_correction_ trace into one graph: r stays on device."""

    def step(gf_D, gF_D, g_G, gf_G):
        r = nk.iga_ratio(gf_D, gF_D)
        nk.iga_correction_(g_G, gf_G, r)
        return r

    shapes_D, shapes_G = [(7, 5), (), (59,)], [(3, 4), (0,), (97,)]
    gf_D = tensor_list(shapes_D, torch.float32, device, seed=41, layout="mixed")
    gF_D = tensor_list(shapes_D, torch.float32, device, seed=42, layout="mixed", which=1)
    gf_G = tensor_list(shapes_G, torch.float32, device, seed=43, layout="mixed")
    g_eager = tensor_list(shapes_G, torch.float32, device, seed=44, layout="contiguous")
    g_compiled = snapshot(g_eager)
    r_eager = step(gf_D, gF_D, g_eager, gf_G)
    torch._dynamo.reset()
    r_compiled = torch.compile(step, fullgraph=True)(gf_D, gF_D, g_compiled, gf_G)
    assert r_compiled.dtype == r_eager.dtype and r_compiled.shape == ()
    torch.testing.assert_close(r_compiled, r_eager)
    for p, (c, e) in enumerate(zip(g_compiled, g_eager)):
        torch.testing.assert_close(c, e, msg=lambda m, p=p: f"g_G[{p}]: {m}")


# ----------------------------------------------------------------------------------- bad inputs


IGA_RATIO_ERRORS = {
    "gf_D-tensor": (lambda: nk.iga_ratio(_t(3), [_t(3)]), TypeError,
                    r"^gf_D must be a list or tuple of tensors, got Tensor"),
    "gF_D-tensor": (lambda: nk.iga_ratio([_t(3)], _t(3)), TypeError,
                    r"^gF_D must be a list or tuple"),
    "gf_D-empty": (lambda: nk.iga_ratio([], []), ValueError, r"^gf_D must hold at least 1"),
    "gF_D-empty": (lambda: nk.iga_ratio([_t(3)], []), ValueError, r"^gF_D must hold at least 1"),
    "lengths": (lambda: nk.iga_ratio([_t(3), _t(1)], [_t(3)]), ValueError,
                r"^gF_D has 1 tensors but gf_D has 2"),
    "shape-gF_D[1]": (lambda: nk.iga_ratio([_t(3), _t(2, 2)], [_t(3), _t(4)]), ValueError,
                      r"^gF_D\[1\] has shape \(4,\) but gf_D\[1\] has \(2, 2\)"),
    "int-gf_D[0]": (lambda: nk.iga_ratio([_t(3, dtype=torch.int64)], [_t(3)]), TypeError,
                    r"^gf_D\[0\] must have a floating dtype.*got torch.int64"),
    "mixed-gF_D[0]": (lambda: nk.iga_ratio([_t(3)], [_t(3, dtype=torch.float64)]), TypeError,
                      r"^gF_D\[0\] has dtype torch.float64, expected torch.float32"),
    "not-a-tensor": (lambda: nk.iga_ratio([_t(3)], [[0.0, 0.0, 0.0]]), TypeError,
                     r"^gF_D\[0\] must be a torch.Tensor, got list"),
    "eps-negative": (lambda: nk.iga_ratio([_t(3)], [_t(3)], eps=-1e-12), ValueError,
                     r"^eps must be finite and >= 0, got -1e-12"),
    "eps-inf": (lambda: nk.iga_ratio([_t(3)], [_t(3)], eps=math.inf), ValueError,
                r"^eps must be finite and >= 0, got inf"),
    "eps-nan": (lambda: nk.iga_ratio([_t(3)], [_t(3)], eps=math.nan), ValueError,
                r"^eps must be finite and >= 0, got nan"),
    "eps-tensor": (lambda: nk.iga_ratio([_t(3)], [_t(3)], eps=torch.tensor(1e-12)), TypeError,
                   r"^eps must be a Python number, got Tensor"),
    "eps-str": (lambda: nk.iga_ratio([_t(3)], [_t(3)], eps="0"), TypeError,
                r"^eps must be a Python number, got str"),
    "eps-None": (lambda: nk.iga_ratio([_t(3)], [_t(3)], eps=None), TypeError,
                 r"^eps must be a Python number, got NoneType"),
}

IGA_CORRECTION_ERRORS = {
    "g_G-tensor": (lambda: nk.iga_correction_(_t(3), [_t(3)], 1.0), TypeError,
                   r"^g_G must be a list or tuple of tensors, got Tensor"),
    "gf_G-tensor": (lambda: nk.iga_correction_([_t(3)], _t(3), 1.0), TypeError,
                    r"^gf_G must be a list or tuple"),
    "g_G-empty": (lambda: nk.iga_correction_([], [], 1.0), ValueError,
                  r"^g_G must hold at least 1"),
    "gf_G-empty": (lambda: nk.iga_correction_([_t(3)], [], 1.0), ValueError,
                   r"^gf_G must hold at least 1"),
    "lengths": (lambda: nk.iga_correction_([_t(3)], [_t(3), _t(3)], 1.0), ValueError,
                r"^gf_G has 2 tensors but g_G has 1"),
    "shape-gf_G[1]": (lambda: nk.iga_correction_([_t(3), _t(5)], [_t(3), _t(5, 1)], 1.0),
                      ValueError, r"^gf_G\[1\] has shape \(5, 1\) but g_G\[1\] has \(5,\)"),
    "int-g_G[0]": (lambda: nk.iga_correction_([_t(3, dtype=torch.int32)], [_t(3)], 1.0),
                   TypeError, r"^g_G\[0\] must have a floating dtype"),
    "mixed-gf_G[0]": (lambda: nk.iga_correction_([_t(3)], [_t(3, dtype=torch.float16)], 1.0),
                      TypeError, r"^gf_G\[0\] has dtype torch.float16, expected torch.float32"),
    "r-(1,)": (lambda: nk.iga_correction_([_t(3)], [_t(3)], _t(1)), ValueError,
               r"^r must be a number or a 0-d tensor, got shape \(1,\)"),
    "r-(3,)": (lambda: nk.iga_correction_([_t(3)], [_t(3)], _t(3)), ValueError,
               r"^r must be a number or a 0-d tensor, got shape \(3,\)"),
    "r-int-tensor": (lambda: nk.iga_correction_([_t(3)], [_t(3)], torch.tensor(2)), TypeError,
                     r"^r must have a floating dtype"),
    "r-None": (lambda: nk.iga_correction_([_t(3)], [_t(3)], None), TypeError,
               r"^r must be a Python number, got NoneType"),
    "r-bool": (lambda: nk.iga_correction_([_t(3)], [_t(3)], False), TypeError,
               r"^r must be a Python number, got bool"),
    "g_G[0]-expanded": (lambda: nk.iga_correction_([_t(1, 4).expand(3, 4)], [_t(3, 4)], 1.0),
                        ValueError, r"^g_G\[0\] is written in place but has overlapping memory"),
    "g_G[2]-expanded": (lambda: nk.iga_correction_([_t(2), _t(2), torch.zeros(()).expand(7)],
                                                   [_t(2), _t(2), _t(7)], 1.0),
                        ValueError, r"^g_G\[2\] is written in place but has overlapping memory"),
}


# These rejections are made by the public functions' input checks, before any backend is chosen
# (raises_before_dispatch fails otherwise): one test per case, not one per backend.
# Rejections made by the public functions' input checks, before any backend is chosen
# (raises_before_dispatch fails otherwise): one test per case, not one per backend.
test_iga_ratio_bad_inputs = bad_inputs_test(IGA_RATIO_ERRORS)
test_iga_correction_bad_inputs = bad_inputs_test(IGA_CORRECTION_ERRORS)


def test_iga_correction_error_writes_nothing():
    """Validation finishes before the first write: an error at the last position leaves every
    ``g_G`` tensor as it was (no kernel runs: raises_before_dispatch)."""
    g = [torch.full((3,), 5.0), torch.full((2,), 5.0), torch.full((2,), 5.0)]
    with raises_before_dispatch(ValueError, match=r"gf_G\[2\]"):
        nk.iga_correction_(g, [torch.ones(3), torch.ones(2), torch.ones(3)], 1.0)
    with raises_before_dispatch(ValueError, match=r"g_G\[2\]"):
        nk.iga_correction_(g[:2] + [torch.ones(()).expand(2)], [torch.ones(3), torch.ones(2),
                                                               torch.ones(2)], 1.0)
    assert all((t == 5).all() for t in g)
