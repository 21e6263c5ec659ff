"""Load the compiled backends that are present; record why the others are not.

A missing piece never breaks ``import nats_kernels``: its ops run on the next backend of the
``auto`` order, and the first such fallback warns once (see ``_dispatch.kernel``).
"""

from __future__ import annotations

import importlib
import os

import torch

from . import _compat, _dispatch


def _register_ext(backend: str, dispatch_key: str) -> None:
    """Route each ext op that has a kernel for ``dispatch_key`` to the compiled backend. If torch
    can no longer tell (see ``_compat``), the backend is marked unavailable, saying why."""
    try:
        ops = [op for op in _dispatch.KERNEL_OPS
               if _compat.has_kernel(f"nats_kernels_ext::{op}", dispatch_key)]
    except _compat.PrivateAPIError as e:
        _dispatch.mark_unavailable(backend, str(e))
        return
    for op in ops:  # the OpOverload itself: calling it skips the packet's overload resolution
        _dispatch.register(backend, op)(getattr(torch.ops.nats_kernels_ext, op).default)
    if backend == "cpu":
        _dispatch.mark_native_cpu(ops)


def _unbuilt_checkout_hint(here: str = os.path.dirname(os.path.abspath(__file__))) -> str:
    """A hint when this package was imported from a source checkout that holds no build: the
    usual cause is running Python in the checkout after a non-editable ``pip install .``, whose
    current-directory entry on ``sys.path`` shadows the installed copy."""
    if not os.path.exists(os.path.join(os.path.dirname(here), "setup.py")):
        return ""
    if any(name.startswith("_C.") for name in os.listdir(here)):
        return ""
    return (f"; this is the source checkout {here}, which holds no build: run Python from "
            "another folder to use an installed copy, or build here with "
            "`pip install --no-build-isolation -e .`")


def _load_ext(backend: str, module: str, dispatch_key: str, why) -> None:
    """Import the compiled extension ``module`` and register its ``dispatch_key`` kernels as
    ``backend``; if it cannot be imported, mark ``backend`` unavailable with ``why(error)``."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        _dispatch.mark_unavailable(backend, why(e))
        return
    _register_ext(backend, dispatch_key)


def _load_cpu() -> None:
    _load_ext("cpu", "nats_kernels._C", "CPU", lambda e: (
        f"C++ extension not built or not loadable ({e}); reinstall with "
        "`pip install --no-build-isolation -e .` without NATS_KERNELS_SKIP_EXT"
        + _unbuilt_checkout_hint()
    ))


def _load_cuda() -> None:
    if not torch.cuda.is_available():
        _dispatch.mark_unavailable("cuda", "no CUDA device visible to torch")
        return
    _load_ext("cuda", "nats_kernels._cuda", "CUDA",
              lambda e: f"CUDA extension not built or not loadable ({e})")


def _load_triton() -> None:
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not (torch.cuda.is_available() or interpret):
        _dispatch.mark_unavailable(
            "triton", "no CUDA device (TRITON_INTERPRET=1 runs Triton on CPU tensors)"
        )
        return
    try:
        importlib.import_module("triton")
    except ImportError as e:
        _dispatch.mark_unavailable("triton", f"triton is not importable ({e})")
        return
    importlib.import_module("nats_kernels.triton")


def load_all() -> None:
    _load_cpu()
    _load_cuda()
    _load_triton()
