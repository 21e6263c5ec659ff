"""Input checks shared by the public ops. They read metadata only (shape, dtype, device), never a
tensor's values, so they cost no host sync."""

from __future__ import annotations

import itertools
import math
import numbers
import operator
from collections.abc import Sequence

import torch

from . import _dispatch

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# torch.finfo(dtype).max, looked up once (torch.finfo costs microseconds per call).
_LARGEST = {dt: torch.finfo(dt).max for dt in FLOATING}

#: The calling convention of the C++ fast paths this Python side expects (_C.fast_path_abi).
FAST_PATH_ABI = 3

try:  # the C++ pass over the common case of the list checks (csrc/nats_kernels.cpp)
    from . import _C as native
    from ._C import lists_ok as _lists_ok
    # A stale build (its fast paths missing, or taking their arguments as an older Python side
    # passed them): the Python checks alone.
    if getattr(native, "fast_path_abi", 0) != FAST_PATH_ABI:
        native = None
except ImportError:  # no extension built (or a stale one): the Python checks alone
    native = _lists_ok = None


def cpu_fast(op: str) -> bool:
    """Whether ``op`` may try its CPU fast path ``native.cpu_<op>`` (design §8.1): the extension
    has it, ``_dispatch.native_cpu(op)``, and torch.compile is not tracing (checked first: Dynamo
    sees a constant and never meets the C function). The fast path declines (None / False)
    anything but the common case, which the full checks then handle."""
    return (not torch.compiler.is_compiling() and native is not None
            and _dispatch.native_cpu(op))


def common_lists(lists: tuple, written: int = 0) -> bool:
    """Whether the lists of a public list op are the common case that needs no further check
    and may run its kernel directly (design §8.1), decided in one C++ pass: lists or tuples of
    one length n >= 1 of plain tensors with one floating dtype, one CPU/CUDA device and equal
    shapes position by position; with grad mode on, nothing requires grad (and no tensor of the
    first ``written`` lists is a view of one that does); the written tensors contiguous and
    pairwise disjoint in memory; and torch.compile not tracing. False is not an error: the
    Python checks then run and raise, or let the call through the custom op."""
    # is_compiling first: under torch.compile it is the constant True, so Dynamo never meets the
    # C function (which it cannot trace).
    return (not torch.compiler.is_compiling() and _lists_ok is not None
            and _lists_ok(lists, written))


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Accumulation dtype (design §9.1): float64 for float64, float32 otherwise; of
    several dtypes (tensors of mixed dtypes summed together), float64 when any is float64."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def tensor(name: str, t, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOATING:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32, float64), "
            f"got {t.dtype}"
        )
    return t


def same_device(device: torch.device, **named: torch.Tensor | None) -> None:
    for name, t in named.items():
        if t is not None and t.device != device:
            raise ValueError(
                f"{name} is on {t.device}, expected {device} (all tensors on one device)"
            )


def shape(name: str, t: torch.Tensor, expected: Sequence[int]) -> None:
    if t.shape != expected and tuple(t.shape) != tuple(expected):  # Size == tuple: no copy
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def same_dtype(name: str, t: torch.Tensor, dtype: torch.dtype, like: str) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype} (the dtype of {like})")


def no_internal_overlap(name: str, t: torch.Tensor) -> None:
    # What at::has_internal_overlap can decide cheaply: a stride-0 dim of size > 1 (expand).
    if t.is_contiguous():
        return
    if any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride())):
        raise ValueError(f"{name} is written in place but has overlapping memory (e.g. expanded)")


# ----------------------------------------------------------------------------- Python values
#
# Configuration arrives as Python values (never tensors: a tensor's value would have to be read
# on the host). bool is an int to Python but never a count or a size here.


def is_int(value, *, exact: bool = False) -> bool:
    """Whether ``value`` is an integer and not a bool: any ``numbers.Integral`` (numpy integers
    too), or with ``exact=True`` Python's own ``int`` only (what can be written to JSON)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int if exact else numbers.Integral)


def is_number(value, *, exact: bool = False) -> bool:
    """Whether ``value`` is a real number and not a bool: any ``numbers.Real``, or with
    ``exact=True`` an ``int`` or ``float`` (subclasses included) only."""
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if exact else numbers.Real)


def integer(name: str, value, *, minimum: int | None = None) -> int:
    """A count or a size: a Python integer (TypeError otherwise), at least ``minimum`` when given
    (ValueError otherwise)."""
    if not is_int(value):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def number(name: str, v) -> float:
    """A hyperparameter: a Python number (not a tensor: it is configuration, not a device value)."""
    if type(v) is float:  # the usual case, without the numbers.Real check
        return v
    if not is_number(v):
        raise TypeError(f"{name} must be a Python number, got {type(v).__name__}")
    try:
        return float(v)
    except OverflowError:  # an int such as 10**400
        raise ValueError(f"{name} is out of the float range, got {v}") from None


def scalar(name: str, v, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A per-step scalar: a Python number or a 0-d floating tensor on ``device``.

    Numbers must be finite (a NaN weight would silently turn every result into NaN) and become
    0-d tensors by a fill on ``device`` (no host-to-device copy, capturable in a CUDA graph);
    0-d tensors pass through untouched, their value is never read on the host (nor checked).
    """
    if isinstance(v, torch.Tensor):
        tensor(name, v)
        if v.dim() != 0:
            raise ValueError(f"{name} must be a number or a 0-d tensor, got shape {tuple(v.shape)}")
        same_device(device, **{name: v})
        return v
    return torch.full((), finite(name, v, dtype=dtype), dtype=dtype, device=device)


def tensor_list(name: str, seq, *, min_len: int = 1) -> list[torch.Tensor]:
    if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(seq).__name__}")
    out = list(seq)
    if len(out) < min_len:
        raise ValueError(f"{name} must hold at least {min_len} tensor(s), got {len(out)}")
    # Fast path without building names (this runs on every call of the list ops); the loop that
    # raises with the offending position runs only when something is wrong.
    if not all(isinstance(t, torch.Tensor) and t.dtype in FLOATING for t in out):
        for i, t in enumerate(out):
            tensor(f"{name}[{i}]", t)
    return out


def _agreeing_lists(lists: Sequence) -> tuple[list[list[torch.Tensor]], torch.device,
                                               torch.dtype] | None:
    """The common case of :func:`paired_lists` in one pass (design §8.1): lists or tuples of equal
    non-zero length holding floating tensors with one device, one dtype and equal shapes position
    by position. Returns what :func:`paired_lists` returns, or None for anything else (which the
    full check then examines and names)."""
    if not all(type(seq) is list or type(seq) is tuple for seq in lists):
        return None
    first = lists[0]
    n = len(first)
    if n == 0 or any(len(seq) != n for seq in lists):
        return None
    t0 = first[0]
    if not isinstance(t0, torch.Tensor) or t0.dtype not in FLOATING:
        return None
    device, dtype = t0.device, t0.dtype
    if not all(isinstance(t, torch.Tensor) and t.dtype is dtype and t.device == device
               for seq in lists for t in seq):
        return None
    shapes = [t.shape for t in first]
    if not all(t.shape == sh for seq in lists[1:] for t, sh in zip(seq, shapes)):
        return None
    return [seq if type(seq) is list else list(seq) for seq in lists], device, dtype


def paired_lists(
    names: Sequence[str], lists: Sequence
) -> tuple[list[list[torch.Tensor]], torch.device, torch.dtype]:
    """Check lists of tensors that run side by side: equal lengths, equal shapes position by
    position, one device and one dtype for all of them. Returns the lists, device and dtype."""
    fast = _agreeing_lists(lists)
    if fast is not None:
        return fast
    checked = [tensor_list(n, seq) for n, seq in zip(names, lists)]
    first = checked[0]
    device, dtype = first[0].device, first[0].dtype
    for n, seq in zip(names[1:], checked[1:]):
        if len(seq) != len(first):
            raise ValueError(f"{n} has {len(seq)} tensors but {names[0]} has {len(first)}")
    shapes = [t.shape for t in first]
    if all(t.device == device and t.dtype == dtype and t.shape == sh
           for seq in checked for t, sh in zip(seq, shapes)):
        return checked, device, dtype
    for n, seq in zip(names, checked):  # something is wrong: find it and say where
        for i, t in enumerate(seq):
            same_device(device, **{f"{n}[{i}]": t})
            same_dtype(f"{n}[{i}]", t, dtype, f"{names[0]}[0]")
            if t.shape != first[i].shape:
                raise ValueError(
                    f"{n}[{i}] has shape {tuple(t.shape)} but {names[0]}[{i}] has "
                    f"{tuple(first[i].shape)}"
                )
    return checked, device, dtype


def flag(name: str, value) -> bool:
    """A bool option: ``True`` or ``False`` only (a string such as "no" is not taken by its
    truthiness)."""
    if not isinstance(value, bool):
        kind = type(value).__name__
        if kind == "bool":  # numpy.bool: name its module, "got bool" would read as nonsense
            kind = f"{type(value).__module__}.bool"
        raise TypeError(f"{name} must be a bool, got {kind} (True or False only)")
    return value


def finite(name: str, value, *, minimum: float | None = None,
           dtype: torch.dtype | None = None) -> float:
    """A hyperparameter that must be a finite Python number (NaN and +-inf rejected), at least
    ``minimum`` when given, and within the range of ``dtype`` (the math type it is used in)
    when given."""
    x = number(name, value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    if minimum is not None and x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")
    if dtype is not None and abs(x) > _LARGEST[dtype]:
        raise ValueError(f"{name} = {x:g} is out of the range of {dtype}, the math type it is "
                         f"used in (largest {_LARGEST[dtype]:g})")
    return x


def positive(name: str, value) -> float:
    """A Python number that is finite and > 0 (a step size, a learning rate, a weight)."""
    x = number(name, value)
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return x


def nonnegative(name: str, value) -> float:
    """A Python number that is finite and >= 0 (an epsilon added to a denominator)."""
    x = number(name, value)
    if not (math.isfinite(x) and x >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {x}")
    return x


def weights(name: str, value, n: int, n_name: str) -> list[float] | torch.Tensor | None:
    """A weight vector of ``n`` entries (``n_name`` names the count in messages): ``None``, a
    sequence of positive finite Python numbers (returned as a list of floats), or a 1-D floating
    tensor of length ``n`` (returned as it is: its values are not read here)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {value.dtype}")
        if value.dim() != 1 or value.shape[0] != n:
            raise ValueError(
                f"{name} must have shape ({n_name},) = ({n},), got {tuple(value.shape)}"
            )
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"{name} must be None, a sequence of numbers or a 1-D tensor, "
            f"got {type(value).__name__}"
        )
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries but {n_name} = {n}")
    return [positive(f"{name}[{i}]", w) for i, w in enumerate(value)]


# ----------------------------------------------------------------------------- in-place writes
#
# The rules of PyTorch's own in-place ops and out= functions, checked before anything is written
# (metadata only: no value is read). Outside torch.no_grad():
# - a leaf tensor that requires grad (a parameter) cannot be written in place, nor a view of one;
# - a view created under no_grad of a tensor that requires grad cannot be written in place;
# - an out= argument that requires grad is refused: it is overwritten, not differentiated.
# A non-leaf tensor of a graph may be updated in place (cfg_step_, iga_correction_): its version
# counter is bumped, so autograd raises at backward() if the old value was saved for it.


def _inplace_error(name: str, t: torch.Tensor) -> str | None:
    base = t._base
    if base is not None and base.requires_grad:
        if t.is_leaf:  # a view that autograd does not track: made under no_grad
            return (f"{name} is a view created under torch.no_grad() of a tensor that requires "
                    f"grad: it cannot be written in place with grad mode on, as with PyTorch's "
                    f"own in-place ops (make and write it both inside or both outside no_grad)")
        if base.is_leaf:
            return (f"{name} is a view of a leaf tensor that requires grad: it can be written in "
                    f"place only under torch.no_grad(), as with PyTorch's own in-place ops")
    elif t.is_leaf and t.requires_grad:
        return (f"{name} is a leaf tensor that requires grad (a parameter?): it can be written "
                f"in place only under torch.no_grad(), as with PyTorch's own in-place ops "
                f"(did you pass parameters where their .grad was meant?)")
    return None


def inplace(name: str, t: torch.Tensor) -> None:
    """``t`` is updated in place (``t += ...``): PyTorch's rules for in-place ops."""
    if torch.is_grad_enabled():
        msg = _inplace_error(name, t)
        if msg:
            raise RuntimeError(msg)


def out_arg(name: str, t: torch.Tensor) -> None:
    """``t`` is overwritten (an out= argument): PyTorch's rules for out= functions."""
    if torch.is_grad_enabled() and (t.requires_grad or t._base is not None):
        msg = _inplace_error(name, t)
        if msg:
            raise RuntimeError(msg)
        if t.requires_grad:
            raise RuntimeError(
                f"{name} requires grad, but it is overwritten and not differentiated (as "
                f"PyTorch's out= functions refuse): write it under torch.no_grad(), or pass a "
                f"tensor that does not require grad"
            )


def inplace_list(name: str, ts: Sequence[torch.Tensor], *, out: bool = False) -> None:
    if not torch.is_grad_enabled():
        return
    # Only a tensor that requires grad, or a view of one, can break a rule: find those first,
    # without building names (gradients kept as views of one flat buffer all have a _base).
    if not any(t.requires_grad or (t._base is not None and t._base.requires_grad) for t in ts):
        return
    check = out_arg if out else inplace
    for i, t in enumerate(ts):
        check(f"{name}[{i}]", t)


def dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill their byte range exactly, in any order of
    dimensions (contiguous, channels_last, transposed)."""
    if t.numel() == 0 or t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


_ptr = torch.Tensor.data_ptr
_nbytes = operator.attrgetter("nbytes")


def disjoint_outputs(name: str, ts: Sequence[torch.Tensor]) -> None:
    """Refuse a list of written tensors in which two share memory (one tensor twice in ``out``,
    overlapping views of one buffer): a write-write conflict, whose result would depend on the
    order a kernel visits elements. (Inputs that overlap outputs are fine: every backend reads
    them as they were before the call.) Decided from byte ranges for dense tensors (contiguous,
    channels_last, transposed), for others only when they start at the same address (PyTorch's
    own check also gives up on interleaved strided views). Metadata only; skipped while
    torch.compile traces (fake tensors have no addresses)."""
    if len(ts) < 2 or torch.compiler.is_compiling() or ts[0].device.type == "meta":
        return
    try:
        starts = list(map(_ptr, ts))
    except RuntimeError:  # tensors without storage (fake tensors): nothing to decide
        return
    order = sorted(zip(starts, map(operator.add, starts, map(_nbytes, ts)), itertools.count()))
    reach = list(itertools.accumulate((e for _, e, _ in order), max))
    if all(map(operator.ge, (s for s, _, _ in order[1:]), reach)):
        return  # no byte range reaches into the next one: the usual case, at C speed
    for k, (s, e, i) in enumerate(order):
        if s == e:
            continue
        for s2, e2, j in order[k + 1:]:
            if s2 >= e:
                break
            if s2 == e2:
                continue
            a, b = ts[i], ts[j]
            if s2 == s or (dense(a) and dense(b)):
                i, j = min(i, j), max(i, j)
                raise ValueError(f"{name}[{i}] and {name}[{j}] share memory; each tensor written "
                                 f"needs its own memory")
