"""The private or undocumented torch APIs this package relies on, behind one door.

Each function below wraps one API that torch offers no documented way to reach; nothing else in
the package touches them. tests/test_compat.py checks every one of them on the installed torch
and fails, naming the API and what to change here, when a release removes or changes it.
(The Triton kernels need no such door: they reduce with the public ``tl.sum``/``tl.cumsum``.)

* :func:`has_tensor_hooks` reads ``Tensor._backward_hooks`` (private): where
  ``Tensor.register_hook`` keeps its hooks. torch has no public query for them.
* :func:`has_kernel` calls ``OpOverload.has_kernel_for_dispatch_key`` (public name on the
  public ``torch.ops.<ns>.<op>.<overload>`` objects, but undocumented). It replaces the private
  ``torch._C._dispatch_has_kernel_for_dispatch_key``. The documented ``torch.library.get_kernel``
  answers another question (the computed kernel, fallbacks included, raising when there is none).
"""

from __future__ import annotations

import torch

__all__ = ["has_tensor_hooks", "has_kernel", "PrivateAPIError"]


class PrivateAPIError(RuntimeError):
    """A private or undocumented torch API this package relies on is gone or has changed."""


def gone(api: str, user: str, remedy: str) -> PrivateAPIError:
    """The error for ``api`` missing from the installed torch: names it, the function of this
    module that wraps it (``user``) and what to change (``remedy``)."""
    return PrivateAPIError(
        f"torch {torch.__version__} no longer provides {api}, which "
        f"nats_kernels._compat.{user} relies on: {remedy}"
    )


_HOOKS_API = "the private attribute Tensor._backward_hooks"
_HOOKS_REMEDY = (
    "find where Tensor.register_hook now keeps its hooks (torch/_tensor.py) and read that in "
    "has_tensor_hooks; if nothing can tell, make has_tensor_hooks return True (the gradient "
    "buffers are then never reused in place: slower, still correct)"
)


def has_tensor_hooks(t: torch.Tensor) -> bool:
    """Whether ``t`` holds hooks registered with ``Tensor.register_hook`` (removed ones do not
    count). torch has no public query: this reads the private ``Tensor._backward_hooks`` (None
    until a hook is registered, then a dict of the live hooks)."""
    try:
        hooks = t._backward_hooks
    except AttributeError as e:
        raise gone(_HOOKS_API, "has_tensor_hooks", _HOOKS_REMEDY) from e
    return bool(hooks)


_KERNEL_API = "the method has_kernel_for_dispatch_key of torch.ops operator overloads"
_KERNEL_REMEDY = (
    "answer the same question another way in has_kernel (torch.library.get_kernel gives the "
    "computed kernel, fallbacks included); until then the compiled backends cannot register"
)


def has_kernel(qualname: str, dispatch_key: str) -> bool:
    """Whether the operator ``qualname`` (``"ns::op"`` for its default overload, or
    ``"ns::op.overload"``) has a kernel registered for ``dispatch_key`` itself (``"CPU"``,
    ``"CUDA"``, a ``torch.DispatchKey`` name): a fallback or a kernel registered for an
    alias key (CompositeExplicitAutograd, ...) does not count. Raises AttributeError for an
    operator or a dispatch key that does not exist."""
    ns, _, rest = qualname.partition("::")
    name, _, overload = rest.partition(".")
    op = getattr(getattr(getattr(torch.ops, ns), name), overload or "default")
    try:
        query = op.has_kernel_for_dispatch_key
    except AttributeError as e:
        raise gone(_KERNEL_API, "has_kernel", _KERNEL_REMEDY) from e
    return bool(query(getattr(torch.DispatchKey, dispatch_key)))
