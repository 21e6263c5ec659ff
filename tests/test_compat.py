"""nats_kernels._compat: the private or undocumented torch APIs the package relies on.

The first tests check that each such API is still there and still behaves as _compat assumes;
when a torch release removes or changes one, they fail with a message naming it and saying what
to change. The others check the answers of the _compat functions themselves.
"""

import pytest
import torch

from nats_kernels import _compat

# A scratch operator with a CPU kernel only, for the dispatcher query (a public
# torch.library.Library; kept alive for the session so its registrations stay).
_LIB = torch.library.Library("nats_kernels_compat_test", "DEF")
_LIB.define("twice(Tensor x) -> Tensor")
_LIB.impl("twice", lambda x: x * 2, "CPU")
_TWICE = "nats_kernels_compat_test::twice"


def _gone(api: str, where: str, todo: str) -> str:
    return (f"torch {torch.__version__} no longer provides {api} as nats_kernels._compat.{where} "
            f"expects: {todo}")


def test_private_tensor_backward_hooks_still_exists():
    """_compat.has_tensor_hooks reads the private Tensor._backward_hooks."""
    msg = _gone(
        "the private attribute Tensor._backward_hooks (None, then a dict of the hooks that "
        "Tensor.register_hook added)", "has_tensor_hooks",
        "find where Tensor.register_hook keeps its hooks now (torch/_tensor.py) and read that in "
        "has_tensor_hooks, or make it return True (no in-place gradient reuse: slower, correct)")
    t = torch.zeros(3, requires_grad=True)
    assert hasattr(t, "_backward_hooks"), msg
    assert not t._backward_hooks, msg
    handle = t.register_hook(lambda g: g)
    assert isinstance(t._backward_hooks, dict) and len(t._backward_hooks) == 1, msg
    handle.remove()
    assert not t._backward_hooks, msg


def test_undocumented_opoverload_has_kernel_for_dispatch_key_still_exists():
    """_compat.has_kernel calls OpOverload.has_kernel_for_dispatch_key (a public name, but not
    in torch's documentation), which replaced torch._C._dispatch_has_kernel_for_dispatch_key."""
    msg = _gone(
        "OpOverload.has_kernel_for_dispatch_key(torch.DispatchKey) -> bool", "has_kernel",
        "answer 'has this operator a kernel registered for this dispatch key' another way in "
        "has_kernel (torch.library.get_kernel gives the computed kernel, fallbacks included); "
        "until then the compiled backends cannot register their kernels")
    op = torch.ops.nats_kernels_compat_test.twice.default
    assert hasattr(torch, "DispatchKey") and hasattr(torch.DispatchKey, "CPU"), msg
    assert callable(getattr(op, "has_kernel_for_dispatch_key", None)), msg
    assert op.has_kernel_for_dispatch_key(torch.DispatchKey.CPU) is True, msg
    assert op.has_kernel_for_dispatch_key(torch.DispatchKey.CUDA) is False, msg


@pytest.mark.parametrize("leaf", [True, False])
def test_has_tensor_hooks(leaf):
    t = torch.zeros(3, requires_grad=True)
    if not leaf:
        t = t * 2
    assert _compat.has_tensor_hooks(t) is False
    handle = t.register_hook(lambda g: g)
    assert _compat.has_tensor_hooks(t) is True
    second = t.register_hook(lambda g: g)
    handle.remove()
    assert _compat.has_tensor_hooks(t) is True
    second.remove()
    assert _compat.has_tensor_hooks(t) is False


def test_has_tensor_hooks_ignores_other_hooks():
    """Only Tensor.register_hook counts: not a post-accumulate-grad hook, not a hook on the
    tensor's grad_fn."""
    p = torch.zeros(3, requires_grad=True)
    p.register_post_accumulate_grad_hook(lambda t: None)
    assert _compat.has_tensor_hooks(p) is False
    q = p * 2
    q.grad_fn.register_hook(lambda gi, go: None)
    assert _compat.has_tensor_hooks(q) is False
    assert _compat.has_tensor_hooks(torch.zeros(3)) is False


def test_has_kernel():
    assert _compat.has_kernel(_TWICE, "CPU") is True
    assert _compat.has_kernel(_TWICE, "CUDA") is False
    assert _compat.has_kernel(_TWICE + ".default", "CPU") is True
    assert _compat.has_kernel("aten::add.Tensor", "CPU") is True
    with pytest.raises(AttributeError):
        _compat.has_kernel("nats_kernels_compat_test::no_such_op", "CPU")
    with pytest.raises(AttributeError):
        _compat.has_kernel(_TWICE, "NoSuchKey")


def test_has_kernel_agrees_with_the_extension():
    """What _load registers: every hot-path op of the C++ extension has its CPU kernel."""
    pytest.importorskip("nats_kernels._C")
    from nats_kernels._dispatch import KERNEL_OPS

    for op in KERNEL_OPS:
        assert _compat.has_kernel(f"nats_kernels_ext::{op}", "CPU"), op


def test_missing_private_api_raises_naming_it(monkeypatch):
    """When the API is gone, the wrappers raise PrivateAPIError naming it (not a bare
    AttributeError, nor a silent wrong answer)."""

    class NoHooks:
        def __getattr__(self, name):
            raise AttributeError(name)

    with pytest.raises(_compat.PrivateAPIError, match=r"Tensor\._backward_hooks"):
        _compat.has_tensor_hooks(NoHooks())

    for cls in type(torch.ops.nats_kernels_compat_test.twice.default).__mro__:
        if "has_kernel_for_dispatch_key" in vars(cls):
            monkeypatch.delattr(cls, "has_kernel_for_dispatch_key")
    with pytest.raises(_compat.PrivateAPIError, match="has_kernel_for_dispatch_key"):
        _compat.has_kernel(_TWICE, "CPU")
