"""Shared test utilities: the one tolerance table, the backend/device cases, tensor makers, the
reference oracle on float64 copies, bit-level comparison, the hypothesis settings, and the
bad-input table tests."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import nats_kernels as nk
from nats_kernels import _dispatch

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# The one table of tolerances: a result in `dtype` against a float64 oracle computed from the
# same (already rounded) inputs. Accumulation is float32/float64, so what remains is the final
# rounding to `dtype` plus float32 summation error.
TOL = {
    torch.float16: dict(rtol=2e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float32: dict(rtol=2e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
}

# Sizes chosen to miss every power of two and vector width.
AWKWARD = (1, 7, 59, 97, 1025)

# The settings of the hypothesis property tests. The autouse fixtures (backend, threads) are
# function scoped; they set the same environment variable and thread count for every example
# hypothesis draws, so sharing them across examples is what we want.
PROPERTY = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def cases(*ops: str) -> list:
    """(device, backend) pairs for which every op in ``ops`` has a kernel: the suite runs on each
    backend that implements the op, and on nothing that does not (no skips)."""
    out = []
    for device in devices():
        for name, info in nk.backends().items():
            if not info["available"] or not all(op in info["ops"] for op in ops):
                continue
            if name == "cpu" and device != "cpu":
                continue
            if name == "cuda" and device != "cuda":
                continue
            if name == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
                continue
            out.append(pytest.param(device, name, id=f"{device}-{name}"))
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what=""):
    """Compare a result in ``dtype`` with a float64 oracle, NaN equal to NaN; the message names
    the dtype and torch.testing reports the worst element and how many mismatch."""
    assert actual.dtype == dtype or dtype is None, f"{what}: dtype {actual.dtype}, expected {dtype}"
    torch.testing.assert_close(
        actual.double(),
        expected.double(),
        equal_nan=True,
        **TOL[dtype if dtype is not None else actual.dtype],
        msg=lambda m: f"{what} [{dtype}]: {m}",
    )


def make(shape, dtype, device="cpu", *, seed=0, noncontiguous=False, scale=1.0):
    """Random normal tensor of ``shape`` in ``dtype`` (drawn in float64, then rounded).
    ``noncontiguous=True`` returns every other element of a buffer twice as long in the last
    dim: same shape and values distribution, non-unit strides."""
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    if not noncontiguous:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
    wide = shape[:-1] + (2 * shape[-1],) if shape else (2,)
    buf = (torch.randn(wide, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
    return buf[..., ::2] if shape else buf[0]


def on_reference(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` served by the library's reference backend, whatever backend the
    test itself runs under: the oracle of the tests that compare a kernel with the reference run
    on float64 copies of the (already rounded) inputs."""
    saved = os.environ.get(_dispatch.ENV_VAR)
    os.environ[_dispatch.ENV_VAR] = "reference"
    try:
        return fn(*args, **kwargs)
    finally:
        if saved is None:
            del os.environ[_dispatch.ENV_VAR]
        else:
            os.environ[_dispatch.ENV_VAR] = saved


def cfg_oracle(x0, grads, weights, eta, scale):
    """cfg_accumulate by the reference on float64 copies of its inputs."""
    return on_reference(nk.cfg_accumulate, x0.double(), [g.double() for g in grads],
                        weights.double(), eta=eta,
                        scale=None if scale is None else scale.double())


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of a tensor (bit-identical comparison, NaN included)."""
    width = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return t.contiguous().view(width)


def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(bits(x), bits(y))


@contextlib.contextmanager
def raises_before_dispatch(err, match=None):
    """``pytest.raises(err, match=match)`` for a rejection made by the input checks of a public
    function, before it asks ``nats_kernels._dispatch`` for a backend's kernel.

    Such a rejection cannot depend on the backend, so the test runs once, on CPU tensors, and is
    not parametrized with ``cases()``. Should the call reach the dispatch (a check moved into a
    kernel, or a call that validation lets through), it fails with an AssertionError that says
    so: that rejection may differ between backends and needs a test per backend."""
    real = _dispatch.requested_backend

    def refuse():
        raise AssertionError(
            "the call reached backend dispatch: this rejection is not made by the public "
            "function's input checks, so it may differ between backends; test it once per "
            "backend (helpers.cases) instead"
        )

    _dispatch.requested_backend = refuse
    try:
        with pytest.raises(err, match=match) as info:
            yield info
    finally:
        _dispatch.requested_backend = real


def assert_distinguishable(expected: torch.Tensor, other: torch.Tensor, dtype: torch.dtype,
                           what=""):
    """Guard against a blind test: ``other`` (the float64 oracle of a wrong result, e.g. one
    with a term left out) must differ from ``expected`` by more than twice the tolerance of
    ``TOL[dtype]`` in at least one element, so that ``assert_close(result, expected, dtype)``
    fails for a kernel that computes ``other``. Twice: such a kernel returns ``other`` rounded
    to ``dtype``, and that rounding (at most half an ulp, less than rtol) must not bring it back
    within the tolerance."""
    tol = TOL[dtype]
    expected = expected.detach().double().cpu()
    gap = (other.detach().double().cpu() - expected).abs()
    bound = 2 * (tol["atol"] + tol["rtol"] * expected.abs())
    if not bool((gap > bound).any()):
        worst = float((gap / bound).nan_to_num(0.0).max()) if gap.numel() else 0.0
        raise AssertionError(
            f"{what} [{dtype}]: the test cannot tell this from the expected result: the largest "
            f"difference is {worst:.3g} x twice the tolerance (must exceed 1 somewhere); give "
            f"the term a larger weight, scale or eta"
        )


def bad_inputs_test(table: dict, doc: str = ""):
    """A test function over ``table`` (case id -> (call, error type, message regex)): each call
    is rejected by the public function's input checks, before dispatch (so it runs once, not once
    per backend). Bind it to a module-level ``test_*`` name for pytest to collect it there."""

    @pytest.mark.parametrize("call,err,match", table.values(), ids=table.keys())
    def test(call, err, match):
        with raises_before_dispatch(err, match=match):
            call()

    test.__doc__ = doc or None
    return test
