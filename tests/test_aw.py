"""multi_dot, aw_weights, aw_combine_ (design §4, aw-loss) against float64 oracles written here.

Every oracle upcasts the same, already rounded inputs to float64; nothing here calls the library's
reference functions.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import AWKWARD, DTYPES, TOL, assert_close, cases, make, raises_before_dispatch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from listops import LAYOUTS, acc, assert_unchanged, snapshot, tensor_list

import nats_kernels as nk

# The autouse fixtures (backend, threads) are function scoped; they set the same environment
# variable and thread count for every example of a test, so sharing them is what we want.
pytestmark = pytest.mark.single_thread

PROPERTY = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

NORM_EPS = 1e-4  # design §4: added to both squared norms, as in the official aw_loss.py


# Lists of shapes: awkward sizes, 0-d and zero-size tensors mixed in, one huge-ish tensor among
# many tiny ones, single-element lists.
SHAPE_LISTS = {
    "awkward": [(n,) for n in AWKWARD] + [(7, 59), (97, 1, 7), (3, 1025)],
    "0d-and-empty": [(), (0,), (59,), (3, 0, 7), (), (1,), (7, 97), (0, 5)],
    # 42025 elements: more than one CPU grain (32768) and dozens of GPU blocks.
    "huge-among-tiny": [(), (1,), (7,), (0,), (59,)] * 6 + [(1025, 41)] + [(1, 1), (), (7,)] * 6,
    "single": [(97, 59)],
    "single-0d": [()],
    "only-empty": [(0,), (3, 0)],
}
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


def value(w) -> float:
    """A weight as the op sees it: a Python number, or the (rounded) value of a 0-d tensor."""
    return float(w.double()) if isinstance(w, torch.Tensor) else float(w)


def oracle_rule(dots, s_r, s_f, normalized=True, alpha1=0.5, alpha2=0.75, delta=0.05, eps=0.05):
    """design §4's table, transcribed in plain Python float64, with the official code's
    comparisons (anything compared with NaN is false). Returns (w_r, w_f, case)."""
    rr = dots[0] + NORM_EPS
    ff = dots[1] + NORM_EPS
    rf = dots[2]
    r_norm = math.sqrt(rr)
    f_norm = math.sqrt(ff)
    if s_r < alpha1 or s_r < s_f - delta:
        if rf <= 0:
            if normalized:
                return 1 / r_norm + eps, -rf / (ff * r_norm) + eps, 1
            return 1 + eps, -rf / ff + eps, 1
        if normalized:
            return 1 / r_norm + eps, eps, 2
        return 1 + eps, eps, 2
    if s_r > alpha2 and s_r > s_f - delta:
        if rf <= 0:
            if normalized:
                return -rf / (rr * f_norm) + eps, 1 / f_norm + eps, 3
            return -rf / rr + eps, 1 + eps, 3
        if normalized:
            return eps, 1 / f_norm + eps, 4
        return eps, 1 + eps, 4
    if normalized:
        return 1 / r_norm + eps, 1 / f_norm + eps, 5
    return 1 + eps, 1 + eps, 5


def score(logits) -> float:
    """mean(sigmoid(logits)) in float64, from the logits as they are (already rounded)."""
    return float(torch.sigmoid(logits.double()).mean())


def check_weights(result, dots, real_logits, fake_logits, **kw):
    """Compare aw_weights' result with the oracle table; return the oracle case."""
    w_r, w_f, case = result
    d = [float(x) for x in dots.double()]
    e_r, e_f, e_case = oracle_rule(d, score(real_logits), score(fake_logits), **kw)
    for name, w in (("w_r", w_r), ("w_f", w_f), ("case", case)):
        assert isinstance(w, torch.Tensor) and w.shape == (), f"{name}: {w!r}"
        assert w.device == dots.device, name
    assert case.dtype == torch.int64
    assert int(case) == e_case, f"case {int(case)}, expected {e_case}"
    assert_close(w_r, torch.tensor(e_r, dtype=torch.float64), dots.dtype, f"w_r case {e_case}")
    assert_close(w_f, torch.tensor(e_f, dtype=torch.float64), dots.dtype, f"w_f case {e_case}")
    return e_case


def logits_for(s, shape=(16,), dtype=torch.float32, device="cpu", seed=0, spread=0.3):
    """Logits whose sigmoid mean is close to ``s``: logit(s) plus zero-mean noise."""
    noise = make(shape, torch.float64, seed=seed) * spread
    if noise.numel() > 1:
        noise = noise - noise.mean()
    else:
        noise = noise * 0
    return (math.log(s / (1 - s)) + noise).to(dtype).to(device)


# ------------------------------------------------------------------------------------ multi_dot


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
    assert_close(got, oracle_dots(a, b), acc(dtype), "multi_dot")
    assert_unchanged(a, a0, "a")
    assert_unchanged(b, b0, "b")


@pytest.mark.parametrize("device,backend", cases("multi_dot"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_dot_threaded(device, backend, dtype, threads):
    threads()
    shapes = SHAPE_LISTS["huge-among-tiny"]
    a = tensor_list(shapes, dtype, device, seed=6, layout="mixed", which=0)
    b = tensor_list(shapes, dtype, device, seed=7, layout="mixed", which=2)
    assert_close(nk.multi_dot(a, b), oracle_dots(a, b), acc(dtype), "multi_dot threaded")


@pytest.mark.parametrize("device,backend", cases("multi_dot"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_dot_same_list_and_tuples(device, backend, dtype):
    a = tensor_list(SHAPE_LISTS["0d-and-empty"], dtype, device, seed=3, layout="mixed")
    got = nk.multi_dot(tuple(a), a)
    d = oracle_dots(a, a)
    assert_close(got, torch.stack((d[0], d[0], d[0])), acc(dtype), "multi_dot(a, a)")


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
    result = acc(dtype)
    assert ab.dtype == ba.dtype == result
    # Symmetry: swapping the lists swaps the two squared norms and keeps the cross term.
    assert_close(ba, ab[[1, 0, 2]], result, "symmetry")
    # Squared norms are sums of squares.
    assert (ab[:2] >= 0).all()
    # Cauchy–Schwarz, up to the rounding of the three sums.
    rtol = TOL[result]["rtol"]
    assert ab[2].double() ** 2 <= ab[0].double() * ab[1].double() * (1 + 4 * rtol) + 1e-30


# ----------------------------------------------------------------------------------- aw_weights

# (s_r, s_f, row of the table): every way into each row with the default alpha1/alpha2/delta.
SCORES = {
    "weak:s_r<alpha1": (0.3, 0.2, "weak"),
    "weak:s_r<s_f-delta": (0.6, 0.8, "weak"),
    "weak:both": (0.3, 0.6, "weak"),
    "weak:despite_s_r>alpha2": (0.8, 0.9, "weak"),
    "strong": (0.9, 0.3, "strong"),
    "strong:s_f>s_r_within_delta": (0.9, 0.93, "strong"),
    "middle": (0.6, 0.5, "middle"),
    "middle:s_r=s_f": (0.7, 0.7, "middle"),
}
ROW_CASES = {"weak": (1, 2), "strong": (3, 4), "middle": (5, 5)}
# (<g_r,g_r>, <g_f,g_f>, <g_r,g_f>) with rf < 0, rf exactly 0 (counts as <= 0) and rf > 0.
DOTS = {"rf<0": (2.7, 0.9, -0.8), "rf=0": (0.3, 5.1, 0.0), "rf>0": (1.3, 0.45, 0.6)}


@pytest.mark.parametrize("device,backend", cases("aw_weights"))
@pytest.mark.parametrize("scores", SCORES.values(), ids=SCORES.keys())
@pytest.mark.parametrize("dots_values", DOTS.values(), ids=DOTS.keys())
@pytest.mark.parametrize("normalized", [True, False], ids=["alg1", "alg2"])
@pytest.mark.parametrize("dots_dtype", [torch.float32, torch.float64])
def test_aw_weights_table(device, backend, scores, dots_values, normalized, dots_dtype):
    s_r, s_f, row = scores
    dots = torch.tensor(dots_values, dtype=dots_dtype, device=device)
    real = logits_for(s_r, (32,), device=device, seed=1)
    fake = logits_for(s_f, (8, 4), device=device, seed=2)
    result = nk.aw_weights(dots, real, fake, normalized=normalized)
    case = check_weights(result, dots, real, fake, normalized=normalized)
    conflicting, aligned = ROW_CASES[row]
    assert case == (aligned if dots_values[2] > 0 else conflicting)
    assert result[0].dtype == result[1].dtype == dots_dtype


def test_table_covers_every_case_in_both_rules():
    """The parametrization of test_aw_weights_table reaches cases 1..5."""
    seen = {
        oracle_rule(d, s_r, s_f, normalized=n)[2]
        for s_r, s_f, _ in SCORES.values()
        for d in DOTS.values()
        for n in (True, False)
    }
    assert seen == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("device,backend", cases("aw_weights"))
@pytest.mark.parametrize("dots_dtype", DTYPES)
@pytest.mark.parametrize("normalized", [True, False], ids=["alg1", "alg2"])
def test_aw_weights_dots_dtype(device, backend, dots_dtype, normalized):
    """Weights come back in dots' dtype, within that dtype's tolerance of the float64 table."""
    for k, (s_r, s_f, _) in enumerate(SCORES.values()):
        for d in DOTS.values():
            dots = torch.tensor(d, dtype=dots_dtype, device=device)
            real = logits_for(s_r, (5,), device=device, seed=k)
            fake = logits_for(s_f, (6,), device=device, seed=k + 50)
            result = nk.aw_weights(dots, real, fake, normalized=normalized)
            assert result[0].dtype == result[1].dtype == dots_dtype
            check_weights(result, dots, real, fake, normalized=normalized)


@pytest.mark.parametrize("device,backend", cases("aw_weights"))
@pytest.mark.parametrize(
    "real_spec,fake_spec",
    [
        (((), torch.float32), ((), torch.float32)),
        (((1,), torch.float16), ((59,), torch.float16)),
        (((7, 13), torch.bfloat16), ((3, 1, 5), torch.float64)),
        (((97, 1), torch.float64), ((1025,), torch.float16)),
        (((2, 3, 5), torch.float16), ((4, 4), torch.bfloat16)),
    ],
)
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_aw_weights_logits_any_shape_and_dtype(device, backend, real_spec, fake_spec,
                                               noncontiguous):
    for k, (s_r, s_f, _) in enumerate(SCORES.values()):
        real = logits_for(s_r, real_spec[0], dtype=real_spec[1], device=device, seed=k)
        fake = logits_for(s_f, fake_spec[0], dtype=fake_spec[1], device=device, seed=k + 9)
        if noncontiguous:
            real = real.transpose(0, -1) if real.dim() >= 2 else real
            fake = torch.stack((fake, -fake), dim=-1)[..., 0] if fake.dim() else fake
            assert fake.numel() <= 1 or not fake.is_contiguous()
        for d in DOTS.values():
            dots = torch.tensor(d, dtype=torch.float32, device=device)
            check_weights(nk.aw_weights(dots, real, fake), dots, real, fake)


def exact_logits(*values, dtype=torch.float32, device="cpu"):
    """Logits whose sigmoids are exactly 0, 1/2 or 1 (-1000, 0, +1000), so that the mean score
    is an exact binary fraction and boundary comparisons are exact."""
    m = {0.0: -1000.0, 0.5: 0.0, 1.0: 1000.0}
    return torch.tensor([m[v] for v in values], dtype=dtype, device=device)


# (real sigmoids, fake sigmoids, hyperparameters, expected case for rf < 0 / rf > 0)
BOUNDARIES = {
    # s_r == alpha1 is not "< alpha1"; s_r == alpha2 is not "> alpha2": the middle row.
    "s_r=alpha1": ((0.5,), (0.5,), {}, (5, 5)),
    "s_r<alpha1": ((0.0, 0.5, 0.5, 0.5), (0.5,), {}, (1, 2)),
    "s_r=alpha2": ((0.5, 1.0), (0.5,), {}, (5, 5)),
    "s_r>alpha2": ((0.5, 1.0, 1.0, 1.0), (0.5,), {}, (3, 4)),
    # s_r == s_f - delta: not "<" (not weak) and not ">" (not strong).
    "s_r=s_f-delta": ((0.5, 1.0), (1.0,), dict(alpha1=0.5, alpha2=0.5, delta=0.25), (5, 5)),
    "s_r<s_f-delta": ((0.5, 1.0), (1.0,), dict(alpha1=0.5, alpha2=0.5, delta=0.125), (1, 2)),
    "s_r>s_f-delta": ((0.5, 1.0), (1.0,), dict(alpha1=0.5, alpha2=0.5, delta=0.5), (3, 4)),
    "delta=0,s_r=s_f": ((0.5,), (0.5,), dict(alpha1=0.25, alpha2=0.25, delta=0.0), (5, 5)),
    "negative-delta": ((0.5, 1.0, 1.0, 1.0), (0.5, 1.0), dict(delta=-0.25), (1, 2)),
    "s_r=0": ((0.0, 0.0), (0.0,), {}, (1, 2)),
    "s_r=1": ((1.0,), (1.0, 1.0, 1.0), {}, (3, 4)),
    "eps=0": ((0.5, 1.0, 1.0, 1.0), (0.0,), dict(eps=0.0), (3, 4)),
    "custom-all": ((0.5, 1.0), (0.0, 0.5), dict(alpha1=0.8, alpha2=0.9, delta=0.1, eps=0.3),
                   (1, 2)),
}


@pytest.mark.parametrize("device,backend", cases("aw_weights"))
@pytest.mark.parametrize("spec", BOUNDARIES.values(), ids=BOUNDARIES.keys())
@pytest.mark.parametrize("normalized", [True, False], ids=["alg1", "alg2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_aw_weights_boundaries(device, backend, spec, normalized, dtype):
    real_s, fake_s, hyper, (conflicting, aligned) = spec
    real = exact_logits(*real_s, dtype=dtype, device=device)
    fake = exact_logits(*fake_s, dtype=dtype, device=device)
    assert score(real) == sum(real_s) / len(real_s)
    for d, want in ((DOTS["rf<0"], conflicting), (DOTS["rf=0"], conflicting),
                    (DOTS["rf>0"], aligned)):
        dots = torch.tensor(d, dtype=dtype, device=device)
        result = nk.aw_weights(dots, real, fake, normalized=normalized, **hyper)
        assert check_weights(result, dots, real, fake, normalized=normalized, **hyper) == want


@pytest.mark.parametrize("device,backend", cases("aw_weights"))
@pytest.mark.parametrize(
    "hyper",
    [
        dict(alpha1=0.3, alpha2=0.9, delta=0.1, eps=0.01),
        dict(alpha1=0.6, alpha2=0.6, delta=0.0, eps=0.0),
        dict(alpha1=0.2, alpha2=0.4, delta=-0.1, eps=1.5),
        dict(alpha1=0, alpha2=1, delta=0, eps=0),  # Python ints are numbers too
    ],
)
@pytest.mark.parametrize("normalized", [True, False], ids=["alg1", "alg2"])
def test_aw_weights_custom_hyperparameters_grid(device, backend, hyper, normalized):
    """A grid of scores under custom thresholds; points within 1e-3 of a threshold are left
    to test_aw_weights_boundaries (there the float32 and float64 scores may legitimately
    disagree)."""
    thresholds = (hyper["alpha1"], hyper["alpha2"])
    checked = set()
    for i, s_r in enumerate((0.05, 0.25, 0.45, 0.55, 0.65, 0.77, 0.95)):
        for j, s_f in enumerate((0.05, 0.35, 0.65, 0.85, 0.97)):
            real = logits_for(s_r, (11,), device=device, seed=i)
            fake = logits_for(s_f, (3, 3), device=device, seed=100 + j)
            sr, sf = score(real), score(fake)
            if min(abs(sr - t) for t in (*thresholds, sf - hyper["delta"])) < 1e-3:
                continue
            for d in DOTS.values():
                dots = torch.tensor(d, dtype=torch.float64, device=device)
                result = nk.aw_weights(dots, real, fake, normalized=normalized, **hyper)
                checked.add(check_weights(result, dots, real, fake, normalized=normalized,
                                          **hyper))
    assert len(checked) >= 3


@pytest.mark.parametrize("device,backend", cases("aw_weights"))
@pytest.mark.parametrize("normalized", [True, False], ids=["alg1", "alg2"])
@pytest.mark.parametrize(
    "real_s,fake_s,dots_values,expected_case",
    [
        # NaN score of the real data: every comparison is false -> case 5.
        (math.nan, 0.3, DOTS["rf<0"], 5),
        (math.nan, 0.9, DOTS["rf>0"], 5),
        # NaN fake score: only "s_r < alpha1" can still hold; "s_r > s_f - delta" is false.
        (0.3, math.nan, DOTS["rf<0"], 1),
        (0.3, math.nan, DOTS["rf>0"], 2),
        (0.6, math.nan, DOTS["rf<0"], 5),
        (0.9, math.nan, DOTS["rf<0"], 5),
        # NaN rf: "rf <= 0" is false, so the official code takes the rf > 0 column.
        (0.3, 0.2, (1.0, 2.0, math.nan), 2),
        (0.9, 0.3, (1.0, 2.0, math.nan), 4),
        (0.6, 0.5, (1.0, 2.0, math.nan), 5),
        # NaN / Inf squared norms propagate into the weights that use them.
        (0.3, 0.2, (math.nan, 2.0, -1.0), 1),
        (0.9, 0.3, (1.0, math.nan, -1.0), 3),
        (0.6, 0.5, (math.inf, math.inf, 1.0), 5),
        (0.3, 0.2, (1.0, math.inf, -math.inf), 1),
        (0.9, 0.3, (math.inf, 1.0, -1.0), 3),
    ],
)
def test_aw_weights_nan_and_inf(device, backend, normalized, real_s, fake_s, dots_values,
                                expected_case):
    def logits(s, seed):
        if math.isnan(s):
            t = logits_for(0.5, (6,), device=device, seed=seed)
            t[3] = math.nan
            return t
        return logits_for(s, (6,), device=device, seed=seed)

    real, fake = logits(real_s, 1), logits(fake_s, 2)
    for dtype in (torch.float32, torch.float64):
        dots = torch.tensor(dots_values, dtype=dtype, device=device)
        result = nk.aw_weights(dots, real, fake, normalized=normalized)
        assert check_weights(result, dots, real, fake, normalized=normalized) == expected_case


@pytest.mark.parametrize("device,backend", cases("aw_weights"))
def test_aw_weights_inf_logits(device, backend):
    """±inf logits are valid scores (sigmoid 0 or 1)."""
    real = torch.tensor([math.inf, math.inf, 0.0, math.inf], device=device)  # s_r = 0.875
    fake = torch.tensor([-math.inf, 0.0], device=device)  # s_f = 0.25
    dots = torch.tensor(DOTS["rf<0"], device=device)
    assert check_weights(nk.aw_weights(dots, real, fake), dots, real, fake) == 3


# ---------------------------------------------------------------------------------- aw_combine_

WEIGHT_KINDS = {
    "python-float": lambda w, device, dtype: w,
    "0d-acc": lambda w, device, dtype: torch.tensor(w, dtype=acc(dtype), device=device),
    "0d-float64": lambda w, device, dtype: torch.tensor(w, dtype=torch.float64, device=device),
    "0d-float16": lambda w, device, dtype: torch.tensor(w, dtype=torch.float16, device=device),
}


def oracle_combine(g_r, g_f, w_r, w_f):
    return [value(w_r) * r.double() + value(w_f) * f.double() for r, f in zip(g_r, g_f)]


def strided_out(shapes, dtype, device, seed):
    """``out`` as every other element of wider buffers, so that writes outside the views would
    show in the buffers. Returns (out, buffers)."""
    bufs = [make(tuple(s[:-1]) + (2 * s[-1],) if s else (2,), dtype, device, seed=seed + p)
            for p, s in enumerate(shapes)]
    return [b[..., ::2] if s else b[0] for b, s in zip(bufs, shapes)], bufs


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
        out, bufs = strided_out(shapes, dtype, device, seed=13)
    before_r, before_f = snapshot(g_r), snapshot(g_f)
    before_bufs = snapshot(bufs) if bufs else None
    ptrs = [o.data_ptr() for o in out]
    w_r, w_f = 0.8125, torch.tensor(-1.37, dtype=acc(dtype), device=device)
    expected = oracle_combine(g_r, g_f, w_r, w_f)
    assert nk.aw_combine_(out, g_r, g_f, w_r, w_f) is None
    for p, (o, e) in enumerate(zip(out, expected)):
        assert o.data_ptr() == ptrs[p] and o.dtype == dtype
        assert_close(o, e, dtype, f"aw_combine_ out[{p}]")
    assert_unchanged(g_r, before_r, "g_r")
    assert_unchanged(g_f, before_f, "g_f")
    if bufs:
        for p, (b, b0) in enumerate(zip(bufs, before_bufs)):
            rest = (b[..., 1::2], b0[..., 1::2]) if shapes[p] else (b[1], b0[1])
            assert torch.equal(*rest), f"wrote outside out[{p}]"


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
    shapes = SHAPE_LISTS["huge-among-tiny"]
    g_r = tensor_list(shapes, dtype, device, seed=8, layout="mixed", which=1)
    g_f = tensor_list(shapes, dtype, device, seed=9, layout="mixed", which=2)
    out = g_r if alias == "out-is-g_r" else tensor_list(shapes, dtype, device, seed=10,
                                                          layout="mixed")
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


# ----------------------------------------------------------------------- the aw step, end to end


class Disc(torch.nn.Module):
    """A small MLP discriminator plus a linear skip on the first input coordinate (so that
    shifting real and fake data along it moves their scores), and one parameter the loss never
    uses (gradient None: skipped by the official code and by the fused path alike)."""

    def __init__(self, dtype, seed, bias, gain):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.body = torch.nn.Sequential(
                torch.nn.Linear(5, 16), torch.nn.LeakyReLU(0.2), torch.nn.Linear(16, 7),
                torch.nn.LeakyReLU(0.2), torch.nn.Linear(7, 1),
            ).to(dtype)
            self.skip = torch.nn.Linear(5, 1, bias=False).to(dtype)
            self.unused = torch.nn.Linear(3, 3).to(dtype)
        with torch.no_grad():
            self.body[-1].bias.fill_(bias)
            self.skip.weight.zero_()
            self.skip.weight[0, 0] = gain

    def forward(self, x):
        return self.body(x) + self.skip(x)


def official_aw_step(D, loss_r, loss_f, real_logits, fake_logits, normalized):
    """The official aw_loss.py procedure: gradient clones, concatenations, three dots read on
    the host, the rule in Python, a per-parameter write-back into ``.grad``."""
    D.zero_grad(set_to_none=True)
    loss_r.backward(retain_graph=True)
    grad_real = [p.grad.clone() for p in D.parameters() if p.grad is not None]
    real_list = torch.cat([g.reshape(-1) for g in grad_real])
    D.zero_grad(set_to_none=True)
    loss_f.backward(retain_graph=True)
    grad_fake = [p.grad.clone() for p in D.parameters() if p.grad is not None]
    fake_list = torch.cat([g.reshape(-1) for g in grad_fake])
    rdotr = torch.dot(real_list, real_list).item() + 1e-4
    fdotf = torch.dot(fake_list, fake_list).item() + 1e-4
    rdotf = torch.dot(real_list, fake_list).item()
    r_norm, f_norm = math.sqrt(rdotr), math.sqrt(fdotf)
    rs = torch.mean(torch.sigmoid(real_logits))
    fs = torch.mean(torch.sigmoid(fake_logits))
    alpha1, alpha2, delta, eps = 0.5, 0.75, 0.05, 0.05
    if normalized:
        inv_r, inv_f = 1 / r_norm, 1 / f_norm
        scale_r, scale_f = rdotr * f_norm, fdotf * r_norm
    else:
        inv_r = inv_f = 1.0
        scale_r, scale_f = rdotr, fdotf
    if rs < alpha1 or rs < (fs - delta):
        case = 1 if rdotf <= 0 else 2
        w_r = inv_r + eps
        w_f = (-rdotf / scale_f + eps) if rdotf <= 0 else eps
    elif rs > alpha2 and rs > (fs - delta):
        case = 3 if rdotf <= 0 else 4
        w_r = (-rdotf / scale_r + eps) if rdotf <= 0 else eps
        w_f = inv_f + eps
    else:
        case, w_r, w_f = 5, inv_r + eps, inv_f + eps
    index = 0
    for p in D.parameters():
        if p.grad is not None:
            p.grad = w_r * grad_real[index] + w_f * grad_fake[index]
            index += 1
    return w_r, w_f, case, [p.grad for p in D.parameters() if p.grad is not None]


@pytest.mark.parametrize("device,backend",
                         cases("multi_dot", "aw_weights", "aw_combine_"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "gain,bias,mean_real,mean_fake,expected_case",
    [
        (1.0, 0.0, -1.0, -1.0, 1),
        (1.0, -1.0, -3.0, 0.0, 2),
        (1.0, 1.0, 1.0, -1.0, 3),
        (1.0, 0.0, 3.0, 0.0, 3),  # every real above the hinge: g_r = 0, rf = 0 exactly
        (0.5, 0.0, 3.0, -1.0, 4),
        (1.0, 0.0, 1.0, -1.0, 5),
    ],
)
def test_aw_step_end_to_end(device, backend, dtype, gain, bias, mean_real, mean_fake,
                            expected_case):
    for normalized in (True, False):
        check_aw_step(device, dtype, normalized, gain, bias, mean_real, mean_fake, expected_case)


def check_aw_step(device, dtype, normalized, gain, bias, mean_real, mean_fake, expected_case):
    D = Disc(dtype, seed=7, bias=bias, gain=gain).to(device)
    gen = torch.Generator().manual_seed(8)
    e0 = torch.tensor([1.0, 0, 0, 0, 0], dtype=dtype)
    real = (torch.randn(24, 5, generator=gen, dtype=dtype) + mean_real * e0).to(device)
    fake = (torch.randn(24, 5, generator=gen, dtype=dtype) + mean_fake * e0).to(device)
    real_logits, fake_logits = D(real), D(fake)
    loss_r = F.relu(1 - real_logits).mean()
    loss_f = F.relu(1 + fake_logits).mean()

    params = list(D.parameters())
    g_r = torch.autograd.grad(loss_r, params, retain_graph=True, allow_unused=True)
    g_f = torch.autograd.grad(loss_f, params, retain_graph=True, allow_unused=True)
    keep = [i for i, g in enumerate(g_r) if g is not None]
    assert len(keep) == len(params) - 2  # the unused Linear's weight and bias
    g_r = [g_r[i] for i in keep]
    g_f = [g_f[i] for i in keep]
    before_r, before_f = snapshot(g_r), snapshot(g_f)
    dots = nk.multi_dot(g_r, g_f)
    if loss_r.item() == 0:
        assert dots[0] == 0 and dots[2] == 0  # rf exactly 0 takes the rf <= 0 column
    w_r, w_f, case = nk.aw_weights(dots, real_logits.detach(), fake_logits.detach(),
                                   normalized=normalized)
    out = [torch.empty_like(g) for g in g_r]
    nk.aw_combine_(out, g_r, g_f, w_r, w_f)
    assert_unchanged(g_r, before_r, "g_r")
    assert_unchanged(g_f, before_f, "g_f")

    o_r, o_f, o_case, o_grads = official_aw_step(D, loss_r, loss_f, real_logits.detach(),
                                                 fake_logits.detach(), normalized)
    assert int(case) == o_case == expected_case
    assert_close(w_r, torch.tensor(o_r, dtype=torch.float64), dtype, "w_r vs official")
    assert_close(w_f, torch.tensor(o_f, dtype=torch.float64), dtype, "w_f vs official")
    assert len(o_grads) == len(out)
    for p, (o, e) in enumerate(zip(out, o_grads)):
        assert_close(o, e, dtype, f"combined gradient [{p}] vs official")
    # The reported loss, w_r L_r + w_f L_f, from the device weights.
    loss = w_r * loss_r.detach() + w_f * loss_f.detach()
    assert_close(loss, torch.tensor(o_r * loss_r.item() + o_f * loss_f.item(),
                                    dtype=torch.float64), dtype, "aw loss")


# ----------------------------------------------------------------------- torch.compile, no sync


# torch.compile itself warns that torch.jit.script_method is deprecated (torch internals).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("device,backend",
                         cases("multi_dot", "aw_weights", "aw_combine_"))
def test_aw_step_compiles_fullgraph(device, backend):
    """multi_dot + aw_weights + aw_combine_ trace into one graph: no value read on the host."""

    def step(g_r, g_f, out, real_logits, fake_logits):
        dots = nk.multi_dot(g_r, g_f)
        w_r, w_f, case = nk.aw_weights(dots, real_logits, fake_logits, normalized=True)
        nk.aw_combine_(out, g_r, g_f, w_r, w_f)
        return dots, w_r, w_f, case

    shapes = [(7, 5), (), (59,), (0,)]
    g_r = tensor_list(shapes, torch.float32, device, seed=41, layout="mixed")
    g_f = tensor_list(shapes, torch.float32, device, seed=42, layout="mixed", which=1)
    real = logits_for(0.3, (16,), device=device, seed=43)
    fake = logits_for(0.6, (16,), device=device, seed=44)
    eager_out = [torch.zeros_like(t) for t in g_r]
    compiled_out = [torch.zeros_like(t) for t in g_r]
    eager = step(g_r, g_f, eager_out, real, fake)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(g_r, g_f, compiled_out, real, fake)
    for name, e, c in zip(("dots", "w_r", "w_f", "case"), eager, compiled):
        assert c.dtype == e.dtype and c.shape == e.shape, name
        torch.testing.assert_close(c, e, msg=lambda m, name=name: f"{name}: {m}")
    assert int(compiled[3]) == 1
    for p, (c, e) in enumerate(zip(compiled_out, eager_out)):
        torch.testing.assert_close(c, e, msg=lambda m, p=p: f"out[{p}]: {m}")


# ----------------------------------------------------------------------------------- bad inputs


def _t(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


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

GOOD_DOTS = torch.tensor([1.0, 2.0, -0.5])
GOOD_LOGITS = torch.zeros(4)

AW_WEIGHTS_ERRORS = {
    "dots-list": (lambda: nk.aw_weights([1.0, 2.0, 3.0], GOOD_LOGITS, GOOD_LOGITS), TypeError,
                  r"^dots must be a torch.Tensor, got list"),
    "dots-(4,)": (lambda: nk.aw_weights(_t(4), GOOD_LOGITS, GOOD_LOGITS), ValueError,
                  r"^dots must have shape \(3,\), got \(4,\)"),
    "dots-(1,3)": (lambda: nk.aw_weights(_t(1, 3), GOOD_LOGITS, GOOD_LOGITS), ValueError,
                   r"^dots must have shape \(3,\), got \(1, 3\)"),
    "dots-0d": (lambda: nk.aw_weights(_t(), GOOD_LOGITS, GOOD_LOGITS), ValueError,
                r"^dots must have shape \(3,\), got \(\)"),
    "dots-int": (lambda: nk.aw_weights(_t(3, dtype=torch.int64), GOOD_LOGITS, GOOD_LOGITS),
                 TypeError, r"^dots must have a floating dtype"),
    "real-empty": (lambda: nk.aw_weights(GOOD_DOTS, _t(0), GOOD_LOGITS), ValueError,
                   r"^real_logits must not be empty"),
    "fake-empty": (lambda: nk.aw_weights(GOOD_DOTS, GOOD_LOGITS, _t(4, 0)), ValueError,
                   r"^fake_logits must not be empty"),
    "real-int": (lambda: nk.aw_weights(GOOD_DOTS, _t(4, dtype=torch.int32), GOOD_LOGITS),
                 TypeError, r"^real_logits must have a floating dtype.*got torch.int32"),
    "fake-bool": (lambda: nk.aw_weights(GOOD_DOTS, GOOD_LOGITS, _t(4, dtype=torch.bool)),
                  TypeError, r"^fake_logits must have a floating dtype"),
    "fake-list": (lambda: nk.aw_weights(GOOD_DOTS, GOOD_LOGITS, [0.0]), TypeError,
                  r"^fake_logits must be a torch.Tensor"),
    "normalized-int": (lambda: nk.aw_weights(GOOD_DOTS, GOOD_LOGITS, GOOD_LOGITS, normalized=1),
                       TypeError, r"^normalized must be a bool, got int"),
    "normalized-tensor": (lambda: nk.aw_weights(GOOD_DOTS, GOOD_LOGITS, GOOD_LOGITS,
                                                normalized=torch.tensor(True)),
                          TypeError, r"^normalized must be a bool, got Tensor"),
    "normalized-None": (lambda: nk.aw_weights(GOOD_DOTS, GOOD_LOGITS, GOOD_LOGITS,
                                              normalized=None),
                        TypeError, r"^normalized must be a bool"),
    "normalized-str": (lambda: nk.aw_weights(GOOD_DOTS, GOOD_LOGITS, GOOD_LOGITS,
                                             normalized="yes"),
                       TypeError, r"^normalized must be a bool"),
    **{
        f"{name}-{kind}": (
            lambda name=name, bad=bad: nk.aw_weights(GOOD_DOTS, GOOD_LOGITS, GOOD_LOGITS,
                                                     **{name: bad()}),
            TypeError, rf"^{name} must be a Python number, got {type_name}",
        )
        for name in ("alpha1", "alpha2", "delta", "eps")
        for kind, bad, type_name in (
            ("tensor", lambda: torch.tensor(0.5), "Tensor"),
            ("str", lambda: "0.5", "str"),
            ("None", lambda: None, "NoneType"),
            ("bool", lambda: True, "bool"),
        )
    },
}

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


@pytest.mark.parametrize("call,err,match", MULTI_DOT_ERRORS.values(), ids=MULTI_DOT_ERRORS.keys())
def test_multi_dot_bad_inputs(call, err, match):
    with raises_before_dispatch(err, match=match):
        call()


@pytest.mark.parametrize("call,err,match", AW_WEIGHTS_ERRORS.values(),
                         ids=AW_WEIGHTS_ERRORS.keys())
def test_aw_weights_bad_inputs(call, err, match):
    with raises_before_dispatch(err, match=match):
        call()


def test_aw_weights_hyperparameters_are_keyword_only():
    with raises_before_dispatch(TypeError, match="positional"):
        nk.aw_weights(GOOD_DOTS, GOOD_LOGITS, GOOD_LOGITS, True)


@pytest.mark.parametrize("call,err,match", AW_COMBINE_ERRORS.values(),
                         ids=AW_COMBINE_ERRORS.keys())
def test_aw_combine_bad_inputs(call, err, match):
    with raises_before_dispatch(err, match=match):
        call()


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
