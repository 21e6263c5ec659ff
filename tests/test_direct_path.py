"""The eager fast path of the public ops (design §8.1): a validated call runs its backend's
kernel directly, without the ``torch.library`` custom op, when nothing needs the custom op
(plain tensors, no tracing, nothing for autograd to record); otherwise the custom op runs.
The cached backend decision still follows ``NATS_KERNELS_BACKEND`` set between calls, and the
direct path bumps the version counter of what it writes, as PyTorch's in-place ops do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import same_bits
from torch.utils._python_dispatch import TorchDispatchMode

import nats_kernels as nk
from nats_kernels import _dispatch, _validate


class OpLog(TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher's Python modes."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _lists(n=3, size=5):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(size, generator=g) for _ in range(n)]


def _calls():
    """Each public op with small inputs: name -> zero-argument call."""
    a, b, out = _lists(), _lists(), _lists()
    x, g = torch.randn(4, 3), torch.randn(4, 3)
    return {
        "multi_dot": lambda: nk.multi_dot(a, b),
        "iga_ratio": lambda: nk.iga_ratio(a, b),
        "iga_correction_": lambda: nk.iga_correction_(out, b, 0.1),
        "aw_combine_": lambda: nk.aw_combine_(out, a, b, 0.5, 0.5),
        "aw_weights": lambda: nk.aw_weights(torch.tensor([1.0, 2.0, 0.5]), torch.randn(4),
                                            torch.randn(4)),
        "cfg_step_": lambda: nk.cfg_step_(x, g, 0.5, eta=0.1),
        "cfg_accumulate": lambda: nk.cfg_accumulate(x, torch.randn(2, 4, 3), torch.ones(2)),
        "cfg_accumulate_list": lambda: nk.cfg_accumulate(x, [g, g], torch.ones(2)),
        "median_pairwise_distance": lambda: nk.median_pairwise_distance(torch.randn(6, 2)),
    }


@pytest.mark.parametrize("name", sorted(_calls()))
def test_eager_call_skips_the_custom_op(name, monkeypatch):
    monkeypatch.delenv("NATS_KERNELS_BACKEND", raising=False)
    call = _calls()[name]
    with OpLog() as log:
        call()
    assert not any(n.startswith("nats_kernels.") for n in log.names), log.names
    assert f"nats_kernels_ext.{name}.default" in log.names, log.names


def test_inputs_that_require_grad_take_the_custom_op(monkeypatch):
    monkeypatch.delenv("NATS_KERNELS_BACKEND", raising=False)
    a = [t.requires_grad_() for t in _lists()]
    b = _lists()
    with OpLog() as log:
        nk.multi_dot(a, b)
    assert log.names[0] == "nats_kernels.multi_dot.default", log.names
    with torch.no_grad(), OpLog() as log:  # grad mode off: nothing to record, direct again
        nk.multi_dot(a, b)
    assert "nats_kernels.multi_dot.default" not in log.names, log.names


def test_backend_set_between_calls_takes_effect(monkeypatch):
    a, b = _lists(), _lists()
    monkeypatch.delenv("NATS_KERNELS_BACKEND", raising=False)
    with OpLog() as log:
        first = nk.multi_dot(a, b)
    assert "nats_kernels_ext.multi_dot.default" in log.names
    monkeypatch.setenv("NATS_KERNELS_BACKEND", "reference")
    with OpLog() as log:
        second = nk.multi_dot(a, b)
    assert not any("nats_kernels_ext" in n for n in log.names), log.names
    assert _dispatch.route("multi_dot", torch.device("cpu")) is \
        _dispatch._kernels["reference"]["multi_dot"]
    torch.testing.assert_close(first, second)
    monkeypatch.setenv("NATS_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        nk.multi_dot(a, b)
    with pytest.raises(ValueError, match="nonsense"):  # an invalid value is never cached
        nk.multi_dot(a, b)


def _saved_for_backward(t: torch.Tensor):
    """A graph that saved ``t`` (which does not require grad itself) for its backward."""
    w = torch.ones((), requires_grad=True)
    return (w * t).sum() if not isinstance(t, list) else sum((w * u).sum() for u in t)


@pytest.mark.parametrize("op", ["cfg_step_", "cfg_accumulate", "aw_combine_", "iga_correction_"])
def test_direct_writes_bump_the_version_counter(op, monkeypatch):
    """Written on the direct path, a tensor saved by another graph makes that graph's backward
    raise, exactly as after ``x.add_(...)``."""
    monkeypatch.delenv("NATS_KERNELS_BACKEND", raising=False)
    x, g = torch.randn(4, 3), torch.randn(4, 3)
    outs, b = _lists(), _lists()
    written = {"cfg_step_": x, "cfg_accumulate": x, "aw_combine_": outs,
               "iga_correction_": outs}[op]
    loss = _saved_for_backward(written)
    before = [t._version for t in (written if isinstance(written, list) else [written])]
    with OpLog() as log:
        if op == "cfg_step_":
            nk.cfg_step_(x, g, 0.5)
        elif op == "cfg_accumulate":
            nk.cfg_accumulate(g, [g], torch.ones(1), out=x)
        elif op == "aw_combine_":
            nk.aw_combine_(outs, outs, b, 0.5, 0.5)
        else:
            nk.iga_correction_(outs, b, 0.5)
    assert not any(n.startswith("nats_kernels.") for n in log.names)  # the direct path ran
    after = [t._version for t in (written if isinstance(written, list) else [written])]
    assert all(a > bv for a, bv in zip(after, before)), (before, after)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ------------------------------------------------------------------ the C++ common-case check

def _lists_ok_cases():
    """(name, lists, written, expected) for _C.lists_ok: True only for the common case; every
    rule it checks has a case that breaks exactly that rule."""
    a, b = _lists(), _lists()
    buf = torch.randn(20)
    leaf = torch.randn(6, requires_grad=True)
    with torch.no_grad():
        nograd_view = leaf[:3]
    return [
        ("common", (a, b), 1, True),
        ("tuples", (tuple(a), tuple(b)), 1, True),
        ("read list may alias the written one", (a, a), 1, True),
        ("nothing written", (a, a), 0, True),
        ("disjoint views of one buffer", ([buf[:10], buf[10:]], [buf[10:], buf[:10]]), 1, True),
        ("empty", ([], []), 0, False),
        ("lengths differ", (a, b[:2]), 0, False),
        ("not a list", (a, iter(b)), 0, False),
        ("a number", (a, [1.0, 2.0, 3.0]), 0, False),
        ("subclass", (a, b), 0, False),  # b replaced by subclass instances in the test
        ("integer dtype", ([torch.ones(5, dtype=torch.int64)] * 3, b), 0, False),
        ("dtypes differ", (a, [t.double() for t in b]), 0, False),
        ("shapes differ", (a, [t[:4] for t in b]), 0, False),
        ("device meta", ([t.to("meta") for t in a], [t.to("meta") for t in b]), 0, False),
        ("requires grad", (a, [t.clone().requires_grad_() for t in b]), 0, False),
        ("written view of a tensor that requires grad", ([nograd_view], [torch.randn(3)]), 1,
         False),
        ("written non-contiguous", ([torch.randn(5, 2)[:, 0]], [torch.randn(5)]), 1, False),
        ("written twice", ([a[0], a[0]], [b[0], b[1]]), 1, False),
        ("written overlapping views", ([buf[:10], buf[5:15]], [b[0], b[1]]), 1, False),
    ]


class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("case", _lists_ok_cases(), ids=lambda c: c[0])
def test_lists_ok_takes_only_the_common_case(case):
    from nats_kernels._C import lists_ok

    name, lists, written, expected = case
    if name == "subclass":
        lists = (lists[0], [torch.Tensor._make_subclass(_Sub, t) for t in _lists()])
    assert lists_ok(lists, written) is expected


def test_lists_ok_with_grad_mode_off_lets_grad_tensors_through():
    from nats_kernels._C import lists_ok

    a = [t.requires_grad_() for t in _lists()]
    assert not lists_ok((a, a), 0)
    with torch.no_grad():
        assert lists_ok((a, a), 0)


# ------------------------------------------------------------------ the C++ CPU fast paths

FAST_OPS = ("multi_dot", "iga_ratio", "aw_combine_", "iga_correction_", "cfg_step_",
            "median_pairwise_distance")


def _fast_calls():
    a, b, out = _lists(), _lists(), _lists()
    x, g = torch.randn(4, 3), torch.randn(4, 3)
    w = torch.tensor(0.5)
    return {
        "multi_dot": lambda: nk.multi_dot(a, b),
        "iga_ratio": lambda: nk.iga_ratio(a, b),
        "aw_combine_": lambda: nk.aw_combine_(out, a, b, w, w),
        "iga_correction_": lambda: nk.iga_correction_(out, b, w),
        "cfg_step_": lambda: nk.cfg_step_(x, g, w, eta=0.1, scale=torch.rand(4)),
        "cfg_step_ (number weight)": lambda: nk.cfg_step_(x, g, 0.5, eta=1),
        "median_pairwise_distance": lambda: nk.median_pairwise_distance(torch.randn(6, 2)),
        "median_pairwise_distance (cross, batched, budget)": lambda: nk.median_pairwise_distance(
            torch.randn(2, 5, 3, 2), torch.randn(2, 4, 3, 2).double().float(), squared=True,
            batched=True, memory_budget=10**6),
    }


@pytest.fixture
def python_dispatch_refused(monkeypatch):
    """Make the Python dispatch (route) fail loudly: only the C++ fast path can serve a call."""
    def refuse(op, device):
        raise AssertionError(f"{op} went through the Python dispatch")
    monkeypatch.setattr(_dispatch, "route", refuse)
    monkeypatch.delenv("NATS_KERNELS_BACKEND", raising=False)


@pytest.mark.parametrize("name", sorted(_fast_calls()))
def test_common_cpu_calls_take_the_fast_path(name, python_dispatch_refused):
    _fast_calls()[name]()


@pytest.mark.parametrize("backend", ["cpu", "auto", ""])
def test_fast_path_obeys_an_override_to_cpu_or_auto(backend, python_dispatch_refused,
                                                    monkeypatch):
    monkeypatch.setenv("NATS_KERNELS_BACKEND", backend)
    for call in _fast_calls().values():
        call()


@pytest.mark.parametrize("name", sorted(_fast_calls()))
def test_fast_path_declines_other_overrides(name, monkeypatch):
    """NATS_KERNELS_BACKEND=reference: the fast path declines, the reference kernel runs."""
    monkeypatch.setenv("NATS_KERNELS_BACKEND", "reference")
    with OpLog() as log:
        _fast_calls()[name]()
    assert not any("nats_kernels_ext" in n for n in log.names), log.names


def test_fast_path_declines_what_is_not_the_common_case(python_dispatch_refused):
    """Each of these must reach the Python checks and dispatch (which the fixture refuses)."""
    a, b = _lists(), _lists()
    x, g = torch.randn(4, 3), torch.randn(4, 3)
    with torch.inference_mode():
        inf = [torch.randn(5) for _ in range(3)]
    cases = [  # (call, what the Python path then does with it)
        (lambda: nk.iga_correction_(inf, b, torch.tensor(0.1)), AssertionError),  # inference
        (lambda: nk.iga_correction_(a, b, torch.tensor(0.1, requires_grad=True)), AssertionError),
        (lambda: nk.aw_combine_(a, a, b, torch.tensor(1, dtype=torch.int64), torch.tensor(0.5)),
         TypeError),
        (lambda: nk.cfg_step_(x, g, torch.tensor([0.5])), ValueError),  # weight not 0-d
        (lambda: nk.cfg_step_(x, g, 0.5, scale=torch.rand(3)), ValueError),  # wrong batch
        (lambda: nk.cfg_step_(x[:, :2], g[:, :2], 0.5), AssertionError),  # x not contiguous
        (lambda: nk.cfg_step_(x, g, float("nan")), ValueError),
        (lambda: nk.multi_dot(a, [t.double() for t in b]), TypeError),
    ]
    xm, ym = torch.randn(6, 2), torch.randn(4, 2)
    cases += [  # the median: what its fast path leaves to Python
        (lambda: nk.median_pairwise_distance(xm.half()), AssertionError),  # valid, not f32/f64
        (lambda: nk.median_pairwise_distance(torch.randn(6, 2, requires_grad=True)),
         AssertionError),
        (lambda: nk.median_pairwise_distance(xm, memory_budget=np.int64(10**6)), AssertionError),
        (lambda: nk.median_pairwise_distance(torch.randn(6, 0)), AssertionError),  # d = 0
        (lambda: nk.median_pairwise_distance(torch.randn(0, 6, 2), batched=True), AssertionError),
        (lambda: nk.median_pairwise_distance(xm, ym.double()), TypeError),
        (lambda: nk.median_pairwise_distance(xm, torch.randn(4, 3)), ValueError),
        (lambda: nk.median_pairwise_distance(xm, torch.randn(4, 1, 2)), ValueError),
        (lambda: nk.median_pairwise_distance(xm[None], ym[None].expand(2, 4, 2), batched=True),
         ValueError),  # batch mismatch
        (lambda: nk.median_pairwise_distance(xm[:1]), ValueError),  # N = 1
        (lambda: nk.median_pairwise_distance(xm, ym[:0]), ValueError),  # M = 0
        (lambda: nk.median_pairwise_distance(xm[0], batched=True), ValueError),
        (lambda: nk.median_pairwise_distance(torch.tensor(1.0)), ValueError),
        (lambda: nk.median_pairwise_distance(xm, squared=1), TypeError),
        (lambda: nk.median_pairwise_distance(xm, batched=np.bool_(False)), TypeError),
        (lambda: nk.median_pairwise_distance(xm, memory_budget=0), ValueError),
        (lambda: nk.median_pairwise_distance(xm, memory_budget=2**63), ValueError),
        (lambda: nk.median_pairwise_distance(xm, memory_budget=True), TypeError),
        (lambda: nk.median_pairwise_distance(xm, memory_budget=1e6), TypeError),
        (lambda: nk.median_pairwise_distance(xm.tolist()), TypeError),
        (lambda: nk.median_pairwise_distance(xm, ym.tolist()), TypeError),
        (lambda: nk.median_pairwise_distance(torch.Tensor._make_subclass(_Sub, xm)),
         AssertionError),
    ]
    for i, (call, err) in enumerate(cases):
        with pytest.raises(err) as info:
            call()
        if err is AssertionError:  # valid input: it reached the Python dispatch
            assert "went through the Python dispatch" in str(info.value), (i, info.value)


def test_cfg_accumulate_takes_the_fast_path(python_dispatch_refused):
    x0 = torch.randn(4, 3)
    grads = torch.randn(2, 4, 3)
    w = torch.rand(2)
    out = nk.cfg_accumulate(x0, grads, w, eta=0.5, scale=torch.rand(2, 4))
    out2 = nk.cfg_accumulate(x0, list(grads), w, eta=0.5, out=torch.empty_like(x0))
    assert out.shape == x0.shape and out2.shape == x0.shape
    v0 = x0._version
    assert nk.cfg_accumulate(x0, grads, w, out=x0) is x0  # in place
    assert x0._version > v0


# The fast paths check their Python numbers themselves (design §8.1): a float or int (not a
# bool), finite and within the math type's range, ints up to 2**53. Each value below is either
# served by the fast path (the fixture refuses the Python dispatch) or declined to the Python
# checks, which then accept it (and reach the refused dispatch) or raise their own error.
F32_MAX = torch.finfo(torch.float32).max
SERVED = [0.25, -3, 0, 2**53, -(2**53), F32_MAX]
DECLINED_VALID = [2**53 + 1, 10**30]  # valid (float64 math), beyond the exact int range
DECLINED_INVALID = [(True, TypeError), (float("nan"), ValueError), (float("inf"), ValueError),
                    (-float("inf"), ValueError), ("0.5", TypeError), (None, TypeError)]


def _number_calls(value, dtype):
    x, g = torch.randn(4, 3, dtype=dtype), torch.randn(4, 3, dtype=dtype)
    dots = torch.tensor([1.0, 2.0, 0.5], dtype=dtype)
    logits = torch.randn(4, dtype=dtype)
    return {
        "cfg_step_ eta": lambda: nk.cfg_step_(x, g, torch.tensor(0.5, dtype=dtype), eta=value),
        "cfg_step_ weight": lambda: nk.cfg_step_(x, g, value, eta=0.1),
        "cfg_accumulate eta": lambda: nk.cfg_accumulate(x, torch.stack([g, g]),
                                                         torch.ones(2, dtype=dtype), eta=value),
        "aw_weights alpha1": lambda: nk.aw_weights(dots, logits, logits, alpha1=value),
        "aw_weights delta": lambda: nk.aw_weights(dots, logits, logits, delta=value),
    }


def _reaches_python(call):
    with pytest.raises(AssertionError, match="went through the Python dispatch"):
        call()


@pytest.mark.parametrize("value", SERVED, ids=repr)
def test_fast_paths_serve_plain_numbers(value, python_dispatch_refused):
    for dtype in (torch.float32, torch.float64):
        for call in _number_calls(value, dtype).values():
            call()  # would raise AssertionError from the refused Python dispatch
    nk.iga_ratio(_lists(), _lists(), eps=abs(value))


@pytest.mark.parametrize("value", DECLINED_VALID, ids=repr)
def test_fast_paths_decline_numbers_outside_the_exact_range(value, python_dispatch_refused):
    for call in _number_calls(value, torch.float64).values():
        _reaches_python(call)
    _reaches_python(lambda: nk.iga_ratio(_lists(), _lists(), eps=value))


def test_fast_paths_decline_numbers_beyond_float32_for_float32_math(python_dispatch_refused):
    """3.5e38 fits float64 math but not float32: served for float64 tensors, refused (by the
    Python checks, after the fast path declined) for float32 ones."""
    for call in _number_calls(3.5e38, torch.float64).values():
        call()
    for call in _number_calls(3.5e38, torch.float32).values():
        with pytest.raises(ValueError, match="range"):
            call()


@pytest.mark.parametrize("value,err", DECLINED_INVALID, ids=repr)
def test_fast_paths_leave_bad_numbers_to_the_python_checks(value, err, python_dispatch_refused):
    for call in _number_calls(value, torch.float32).values():
        with pytest.raises(err):
            call()
    if value is not None:  # iga_ratio's eps has no None default meaning
        with pytest.raises(err):
            nk.iga_ratio(_lists(), _lists(), eps=value)


@pytest.mark.parametrize("eps", [-1e-12, -1])
def test_iga_ratio_fast_path_leaves_a_negative_eps_to_the_checks(eps, python_dispatch_refused):
    with pytest.raises(ValueError, match="eps"):
        nk.iga_ratio(_lists(), _lists(), eps=eps)


@pytest.mark.parametrize("normalized,err", [(1, TypeError), (None, TypeError)])
def test_aw_weights_fast_path_leaves_a_non_bool_flag_to_the_checks(normalized, err,
                                                                  python_dispatch_refused):
    dots, logits = torch.tensor([1.0, 2.0, 0.5]), torch.randn(4)
    with pytest.raises(err, match="normalized"):
        nk.aw_weights(dots, logits, logits, normalized=normalized)
    nk.aw_weights(dots, logits, logits, normalized=False)  # served


def test_the_build_speaks_the_fast_paths_calling_convention():
    """A stale build with another convention would be refused (native None): this build is the
    one the Python side expects."""
    from nats_kernels import _C, _validate
    assert _C.fast_path_abi == _validate.FAST_PATH_ABI
    assert _validate.native is _C

def test_median_fast_path_matches_the_python_path(monkeypatch):
    """The fast path flattens the features, resolves the default budget and picks element 0 of an
    unbatched call as the Python path does: same shape, dtype and bits, for contiguous,
    strided, transposed, expanded (stride 0), 1-d and image-shaped inputs, with grad mode off
    for inputs that require grad, and for inference tensors."""
    monkeypatch.delenv("NATS_KERNELS_BACKEND", raising=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 3, 2, generator=g)
    y = torch.randn(5, 3, 2, generator=g, dtype=torch.float64)
    with torch.inference_mode():
        inf = torch.randn(7, 4)
    calls = [
        lambda: nk.median_pairwise_distance(x),
        lambda: nk.median_pairwise_distance(x, x[:4] * 3, squared=True),
        lambda: nk.median_pairwise_distance(x[:, :, :1]),  # strided
        lambda: nk.median_pairwise_distance(x.reshape(9, 6).t()),  # transposed
        lambda: nk.median_pairwise_distance(x[:1].expand(5, 3, 2), x[:2]),  # stride 0
        lambda: nk.median_pairwise_distance(x[:, 0, 0]),  # (N,): d = 1
        lambda: nk.median_pairwise_distance(y, batched=True, memory_budget=4096),
        lambda: nk.median_pairwise_distance(y, y[:, :1], batched=True),
        lambda: nk.median_pairwise_distance(inf),
    ]
    with torch.no_grad():
        leaf = x.clone().requires_grad_()
        calls.append(lambda: nk.median_pairwise_distance(leaf))
        fast = [call() for call in calls]
        with monkeypatch.context() as m:
            m.setattr(_validate, "cpu_fast", lambda op: False)
            slow = [call() for call in calls]
    for i, (a, b) in enumerate(zip(fast, slow)):
        assert a.shape == b.shape and a.dtype == b.dtype and not a.requires_grad, (i, a, b)
        assert same_bits(a, b), (i, a, b)


def test_median_fast_path_runs_the_kernel_once(python_dispatch_refused):
    """The common call reaches the kernel directly (no custom op) and once."""
    with OpLog() as log:
        got = nk.median_pairwise_distance(torch.randn(2, 6, 2), batched=True)
    assert log.names.count("nats_kernels_ext.median_pairwise_distance.default") == 1, log.names
    assert not any(n.startswith("nats_kernels.") for n in log.names), log.names
    assert got.shape == (2,)
