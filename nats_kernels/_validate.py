"""Input checks shared by the public ops. They read metadata only (shape, dtype, device), never a
tensor's values, so they cost no host sync."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of SPEC's conventions: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def same_dtype(name: str, t: torch.Tensor, dtype: torch.dtype, like: str) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype} (the dtype of {like})")


def no_internal_overlap(name: str, t: torch.Tensor) -> None:
    # What at::has_internal_overlap can decide cheaply: a stride-0 dim of size > 1 (expand).
    if any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride())):
        raise ValueError(f"{name} is written in place but has overlapping memory (e.g. expanded)")


def number(name: str, v) -> float:
    """A hyperparameter: a Python number (not a tensor: it is configuration, not a device value)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a Python number, got {type(v).__name__}")
    return float(v)


def scalar(name: str, v, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A per-step scalar: a Python number or a 0-d floating tensor on ``device``.

    Numbers become 0-d tensors by a fill on ``device`` (no host-to-device copy, capturable in a
    CUDA graph); 0-d tensors pass through untouched, their value is never read on the host.
    """
    if isinstance(v, torch.Tensor):
        tensor(name, v)
        if v.dim() != 0:
            raise ValueError(f"{name} must be a number or a 0-d tensor, got shape {tuple(v.shape)}")
        same_device(device, **{name: v})
        return v
    return torch.full((), number(name, v), dtype=dtype, device=device)


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


def paired_lists(
    names: Sequence[str], lists: Sequence
) -> tuple[list[list[torch.Tensor]], torch.device, torch.dtype]:
    """Check lists of tensors that run side by side: equal lengths, equal shapes position by
    position, one device and one dtype for all of them. Returns the lists, device and dtype."""
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
