"""The aw weight rule at its thresholds, in every dtype, on every backend.

The rule runs in the accumulation dtype (float32, float64 for float64 dots) on every backend,
the reference included: in float16 a sigmoid mean of 0.49994 rounds to 0.5, and a rule computed
in the dots' dtype would take case 5 where the true mean is below alpha1 (case 1 or 2). Each
case here puts a sigmoid mean a few 1e-5 on one side of a threshold — closer than half a
float16 step, so a rule that rounds the means to float16 or bfloat16 fails — and compares with
the rule evaluated in float64 on the same (already rounded) inputs.
"""

from __future__ import annotations

import functools

import pytest
import torch
from awrule import oracle_rule
from helpers import DTYPES, TOL, cases

import nats_kernels as nk

ALPHA1, ALPHA2, DELTA = 0.5, 0.75, 0.05  # the rule's defaults (awrule.oracle_rule)
# How far from a threshold a sigmoid mean is put: far beyond float32 rounding (~1e-7), within
# half a float16 step at 0.5 (1.2e-4) and at 0.75 (2.4e-4).
NEAR = (2e-6, 6e-5)


@functools.cache
def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits exactly representable in float16 and bfloat16 (so every dtype sees the same
    values), in [-8, 8], sorted, with their sigmoids in float64."""
    g = torch.arange(-2048, 2049, dtype=torch.float64) / 256
    g = g[(g == g.to(torch.bfloat16).double()) & (g == g.half().double())]
    return g, torch.sigmoid(g)


def logits_with_mean(target: float, side: int) -> torch.Tensor:
    """Two logits whose sigmoid mean lies NEAR[0]..NEAR[1] below (side -1) or above (+1)
    ``target``, as float64."""
    g, sg = _grid()
    need = 2 * target - sg
    idx = torch.searchsorted(sg, need)
    for j in (idx - 1, idx):
        j = j.clamp(0, len(g) - 1)
        off = side * ((sg + sg[j]) / 2 - target)
        ok = (off > NEAR[0]) & (off < NEAR[1])
        if ok.any():
            i = int(ok.nonzero()[0])
            return torch.stack((g[i], g[j[i]]))
    raise AssertionError(f"no logits found near {target}")


def mean_sigmoid(logits: torch.Tensor) -> float:
    return torch.sigmoid(logits.double()).mean().item()


# (name, real logits, fake logits, expected side of the threshold):
def scenarios():
    low_fake = torch.tensor([-4.0], dtype=torch.float64)  # s_f - delta < 0: out of the way
    mid_real = torch.tensor([0.5], dtype=torch.float64)  # s_r = 0.62: between alpha1 and alpha2
    high_real = torch.tensor([1.5], dtype=torch.float64)  # s_r = 0.82: above alpha2
    out = []
    for side in (-1, 1):
        out.append((f"alpha1{side:+d}", logits_with_mean(ALPHA1, side), low_fake))
        out.append((f"alpha2{side:+d}", logits_with_mean(ALPHA2, side), low_fake))
        for name, real in (("mid", mid_real), ("high", high_real)):
            # s_r - (s_f - delta) on side `side`: s_f = s_r + delta - side * small.
            s_f_target = mean_sigmoid(real) + DELTA
            out.append((f"delta-{name}{side:+d}", real, logits_with_mean(s_f_target, -side)))
    return out


SCENARIOS = scenarios()


def test_scenarios_sit_where_claimed():
    """The test's own premise: each sigmoid mean is within NEAR of its threshold, on the named
    side, and closer than half a float16 step (so a rule in float16 would misjudge it)."""
    assert len(SCENARIOS) == 8
    for name, real, fake in SCENARIOS:
        s_r, s_f = mean_sigmoid(real), mean_sigmoid(fake)
        side = 1 if name.endswith("+1") else -1
        if name.startswith("alpha"):
            gap = side * (s_r - (ALPHA1 if name.startswith("alpha1") else ALPHA2))
            half_step = 2.0**-13 if name.startswith("alpha1") else 2.0**-12
            assert NEAR[0] < gap < min(NEAR[1], half_step), name
        else:
            gap = side * (s_r - (s_f - DELTA))
            assert NEAR[0] < gap < NEAR[1], name
        for t in (real, fake):  # exact in every dtype
            for dt in DTYPES:
                assert torch.equal(t.to(dt).double(), t), (name, dt)


@pytest.mark.parametrize("device, backend", cases("aw_weights"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_rule_at_threshold(device, backend, dtype, scenario):
    _, real, fake = scenario
    s_r, s_f = mean_sigmoid(real), mean_sigmoid(fake)
    rr, ff = 4.0, 1.0  # exact in every dtype
    for rf in (-1.0, 1.0):
        for normalized in (True, False):
            dots = torch.tensor([rr, ff, rf], dtype=dtype, device=device)
            w_r, w_f, case = nk.aw_weights(dots, real.to(dtype).to(device),
                                           fake.to(dtype).to(device), normalized=normalized)
            e_r, e_f, e_case = oracle_rule([rr, ff, rf], s_r, s_f, normalized)
            what = f"{scenario[0]} rf={rf} normalized={normalized}"
            assert int(case) == e_case, f"{what} [{dtype}]: case {int(case)}, expected {e_case}"
            assert w_r.dtype == dtype and w_f.dtype == dtype
            tol = TOL[dtype]
            torch.testing.assert_close(w_r.double().cpu(), torch.tensor(e_r, dtype=torch.float64),
                                       **tol, msg=f"{what} w_r [{dtype}]")
            torch.testing.assert_close(w_f.double().cpu(), torch.tensor(e_f, dtype=torch.float64),
                                       **tol, msg=f"{what} w_f [{dtype}]")
