"""The one place where an op call is routed to a backend.

Every public op validates its inputs, then calls its ``torch.ops.nats_kernels`` custom op, whose
single implementation asks :func:`kernel` for the function to run. The decision uses three
things only: the device of the inputs, which backends are built/importable and which ops each
of them implements, and the ``NATS_KERNELS_BACKEND`` override
(``auto`` | ``reference`` | ``cpu`` | ``triton`` | ``cuda``).

Backends register their kernels with :func:`register`; a backend that could not be loaded
records why with :func:`mark_unavailable`, which :func:`backends` reports.

The per-call cost (design §8.1): :func:`route` is :func:`kernel` with its answer cached (the
key holds everything the answer depends on, the environment variables included, so setting
``NATS_KERNELS_BACKEND`` between two calls still takes effect), and :func:`eager` says when a
public op may call that kernel directly instead of going through its ``torch.library`` custom
op, whose Python wrapper costs several times a small kernel.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
ENV_VAR = "NATS_KERNELS_BACKEND"

# Preference order of ``auto`` per device type; the reference closes every list.
_AUTO_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}

# The hot-path ops: the kernel-level schemas of csrc/nats_kernels.cpp, which compiled backends
# may implement. Every other op is served by the reference whatever NATS_KERNELS_BACKEND says.
KERNEL_OPS = (
    "cfg_accumulate",
    "cfg_accumulate_list",
    "cfg_step_",
    "median_pairwise_distance",
    "multi_dot",
    "aw_weights",
    "aw_combine_",
    "iga_ratio",
    "iga_correction_",
)

_kernels: dict[str, dict[str, Callable]] = {b: {} for b in BACKENDS}
_unavailable: dict[str, str] = {}
_warned: set[str] = set()
# Ops whose cpu kernel is the C++ extension's own (filled by _load): the ones whose CPU fast path
# in nats_kernels._C (design §8.1) may run.
_native_cpu: set[str] = set()


def register(backend: str, op: str) -> Callable[[Callable], Callable]:
    """Decorator: make ``fn`` the ``backend`` kernel of ``op`` (already validated arguments)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn: Callable) -> Callable:
        _kernels[backend][op] = fn
        _routes.clear()
        return fn

    return deco


def mark_unavailable(backend: str, reason: str) -> None:
    """Record that ``backend`` cannot run here, and why (shown by :func:`backends`)."""
    _unavailable[backend] = reason
    _routes.clear()
    if backend == "cpu":
        _native_cpu.clear()


def mark_native_cpu(ops) -> None:
    """Record that the cpu kernels of ``ops`` are the extension's own (``_load``)."""
    _native_cpu.update(ops)


def native_cpu(op: str) -> bool:
    """Whether ``op`` may take the C++ fast path on CPU tensors (design §8.1): its cpu kernel is
    the extension's, and the registry and override reader are those this module built (a test
    that swaps them gets the Python dispatch, which consults them). The fast path itself reads
    ``NATS_KERNELS_BACKEND`` and declines anything but unset, empty, ``auto`` or ``cpu``."""
    return (op in _native_cpu and _kernels is _REGISTRY[0] and _unavailable is _REGISTRY[1]
            and requested_backend is _REGISTRY[2])


def _device_ok(backend: str, device: torch.device) -> bool:
    if backend == "reference":
        return True
    if backend == "cpu":
        return device.type == "cpu"
    if backend == "cuda":
        return device.type == "cuda"
    # Triton runs CUDA tensors, and CPU tensors under its interpreter.
    return device.type == "cuda" or (
        device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    )


def requested_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value != "auto" and value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of auto, {', '.join(BACKENDS)}")
    return value


def kernel(op: str, device: torch.device) -> Callable:
    """Return the kernel that runs ``op`` on ``device``: the one dispatch decision."""
    want = requested_backend()
    if op not in KERNEL_OPS:  # not a hot path (annealed_weights): the reference, whatever is asked
        return _kernels["reference"][op]
    if want != "auto":
        if want in _unavailable:
            raise RuntimeError(
                f"{ENV_VAR}={want} but the {want} backend is unavailable: {_unavailable[want]}"
            )
        if not _device_ok(want, device):
            raise RuntimeError(
                f"{ENV_VAR}={want} cannot run op {op} on device {device}"
                + (" (set TRITON_INTERPRET=1 to run Triton on CPU tensors)"
                   if want == "triton" and device.type == "cpu" else "")
            )
        fn = _kernels[want].get(op)
        if fn is None:
            raise RuntimeError(f"{ENV_VAR}={want} but the {want} backend has no kernel for {op}")
        return fn
    for backend in _AUTO_ORDER.get(device.type, ("reference",)):
        fn = _kernels[backend].get(op)
        if fn is not None and backend not in _unavailable and _device_ok(backend, device):
            return fn
        if backend in _unavailable and backend not in _warned:
            _warned.add(backend)
            warnings.warn(
                f"nats_kernels: the {backend} backend is unavailable ({_unavailable[backend]}); "
                f"ops on {device.type} tensors fall back to the next backend "
                f"(see nats_kernels.backends())",
                RuntimeWarning,
                stacklevel=3,
            )
    return _kernels["reference"][op]


_routes: dict[tuple, Callable] = {}


def route(op: str, device: torch.device) -> Callable:
    """:func:`kernel`, cached. The key is everything the decision reads: the op, the device type,
    ``NATS_KERNELS_BACKEND`` (and ``TRITON_INTERPRET`` when it asks for triton) as set now, the
    registry objects
    themselves (a test that swaps them for copies gets a fresh decision, and the old one back
    when it restores them). An invalid override raises on every call (nothing is cached)."""
    want = os.environ.get(ENV_VAR)
    # TRITON_INTERPRET decides only whether a forced triton runs CPU tensors (auto never picks
    # triton for them; whether triton loaded at all is in _unavailable).
    interp = os.environ.get("TRITON_INTERPRET") if want and "triton" in want.lower() else None
    key = (op, device.type, want, interp, id(_kernels), id(_unavailable), requested_backend)
    fn = _routes.get(key)
    if fn is None:
        fn = kernel(op, device)
        _routes[key] = fn
    return fn


def eager(first: torch.Tensor, tensors=()) -> bool:
    """Whether a validated public call may run its kernel directly, without the custom op.

    True for plain ``torch.Tensor`` inputs outside ``torch.compile``'s tracing (fake and
    functional tensors, and tracing, need the custom op's registrations) when autograd has
    nothing to record: grad mode off, or no input requires grad. Otherwise the custom op runs,
    with its autograd behaviour. ``first`` is checked for its type (the others share its kind);
    ``first`` and ``tensors`` (None entries allowed) for ``requires_grad``.
    """
    if type(first) is not torch.Tensor or torch.compiler.is_compiling():
        return False
    if not torch.is_grad_enabled():
        return True
    return not (first.requires_grad
                or any(t is not None and t.requires_grad for t in tensors))


# The registry dicts and the override reader as this module built them (see native_cpu).
_REGISTRY = (_kernels, _unavailable, requested_backend)


def backend_name(op: str, device: torch.device | str) -> str:
    """Which backend :func:`kernel` picks for ``op`` on ``device`` right now."""
    fn = kernel(op, torch.device(device))
    return next(b for b in BACKENDS if _kernels[b].get(op) is fn)


def backends() -> dict[str, dict]:
    """What each backend can do here.

    Returns ``{name: {"available": bool, "reason": str, "ops": [op, ...]}}``; ``reason`` says
    why a backend is unavailable, or what it runs on when it is.
    """
    where = {
        "reference": "pure PyTorch, any device",
        "cpu": "C++ extension nats_kernels._C, CPU tensors",
        "triton": "Triton kernels, CUDA tensors (CPU tensors with TRITON_INTERPRET=1)",
        "cuda": "CUDA extension nats_kernels._cuda, CUDA tensors",
    }
    return {
        b: {
            "available": b not in _unavailable,
            "reason": _unavailable.get(b, where[b]),
            "ops": sorted(_kernels[b]),
        }
        for b in BACKENDS
    }
