"""aw_weights (design §4, aw-loss: the weight rule's table) against the float64 oracle of
tests/awrule.py, on every backend that implements it: every row and case of the table, the
dtypes of dots and logits, exact boundaries, custom hyperparameters, NaN and Inf; and its bad
inputs, rejected before dispatch. (tests/test_aw_rule_thresholds.py puts sigmoid means within
half a float16 step of each threshold.)
"""

from __future__ import annotations

import math

import pytest
import torch
from awrule import check_weights, logits_for, oracle_rule, score
from helpers import DTYPES, bad_inputs_test, cases, raises_before_dispatch
from listops import zeros as _t

import nats_kernels as nk

pytestmark = pytest.mark.single_thread


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


# ----------------------------------------------------------------------------------- bad inputs


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

# Rejections made by aw_weights' input checks, before any backend is chosen
# (raises_before_dispatch fails otherwise): one test per case, not one per backend.
test_aw_weights_bad_inputs = bad_inputs_test(AW_WEIGHTS_ERRORS)


def test_aw_weights_hyperparameters_are_keyword_only():
    with raises_before_dispatch(TypeError, match="positional"):
        nk.aw_weights(GOOD_DOTS, GOOD_LOGITS, GOOD_LOGITS, True)
