"""What the build produced agrees with the Python package.

- The kernel-level schemas (``nats_kernels_ext``, csrc/nats_kernels.cpp) and the public custom
  ops (``torch.ops.nats_kernels``, nats_kernels/ops) take the same arguments in the same order:
  the public op hands its arguments to the kernel as they are.
- The CUDA extension, where it was built, loads and has a CUDA kernel for every hot-path op. A
  C++ kernel whose signature differs from its schema makes the dispatcher abort the process at
  load time ("Mismatch in kernel C++ signatures"), so the import runs in a subprocess and the
  abort is reported as a failure with the dispatcher's message.

Where ``nats_kernels._cuda`` is not built (a CPU torch, no toolkit, no GPU and no
``NATS_KERNELS_FORCE_CUDA=1``) its test is skipped, saying so; CI's torch-2.14.1 job
(``.ci/cuda_build``) sets ``NATS_KERNELS_REQUIRE_CUDA_EXT=1``, which turns that skip into a
failure.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import nats_kernels  # noqa: F401  (loads the built extensions)
from nats_kernels._dispatch import KERNEL_OPS


def _signature(schema) -> tuple:
    """Argument names, types, mutability and defaults, and return types of a schema, without
    the namespace and the alias-set names (``a!`` in C++, ``a5!`` from custom_op)."""

    def arg(a):
        written = a.alias_info is not None and a.alias_info.is_write
        return (a.name, str(a.type), written, a.kwarg_only, repr(a.default_value))

    return tuple(arg(a) for a in schema.arguments), tuple(str(r.type) for r in schema.returns)


@pytest.mark.skipif(os.environ.get("NATS_KERNELS_SKIP_EXT") == "1",
                    reason="installed as pure Python on purpose (NATS_KERNELS_SKIP_EXT=1)")
@pytest.mark.parametrize("op", KERNEL_OPS)
def test_kernel_schema_matches_the_public_op(op):
    public = getattr(torch.ops.nats_kernels, op).default._schema
    kernel = getattr(torch.ops.nats_kernels_ext, op).default._schema
    assert _signature(kernel) == _signature(public), (
        f"csrc/nats_kernels.cpp declares\n  {kernel}\nbut the public op is\n  {public}")


def test_signature_tells_schemas_apart():
    """The comparison above sees a changed type, name, mutability and return."""
    from torch._C import parse_schema

    base = parse_schema("ns::f(Tensor(a!) x, Tensor y, float eta) -> ()")
    assert _signature(base) == _signature(parse_schema("ns::f(Tensor(b!) x, Tensor y, "
                                                       "float eta) -> ()"))
    for other in ("ns::f(Tensor x, Tensor y, float eta) -> ()",
                  "ns::f(Tensor(a!) x, Tensor z, float eta) -> ()",
                  "ns::f(Tensor(a!) x, Tensor y, int eta) -> ()",
                  "ns::f(Tensor(a!) x, Tensor y, float eta) -> Tensor",
                  "ns::f(Tensor(a!) x, Tensor y, float eta=1.0) -> ()"):
        assert _signature(parse_schema(other)) != _signature(base), other


_CUDA_EXT_CHECK = """
import torch
import nats_kernels
import nats_kernels._cuda
from nats_kernels._dispatch import KERNEL_OPS

from nats_kernels._compat import has_kernel
missing = [op for op in KERNEL_OPS if not has_kernel(f"nats_kernels_ext::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
print("cuda kernels:", len(KERNEL_OPS))
"""


def test_cuda_extension_loads_with_a_kernel_for_every_hot_path_op(tmp_path):
    built = importlib.util.find_spec("nats_kernels._cuda") is not None
    if not built:
        if os.environ.get("NATS_KERNELS_REQUIRE_CUDA_EXT") == "1":
            pytest.fail("NATS_KERNELS_REQUIRE_CUDA_EXT=1 but nats_kernels._cuda was not built "
                        "(see setup.py's messages: pip install -v)")
        pytest.skip("nats_kernels._cuda is not built here (CPU torch, no CUDA toolkit, or no GPU "
                    "without NATS_KERNELS_FORCE_CUDA=1)")
    # The package this process imported (installed, editable or an in-place build), first on
    # the path of a process started elsewhere.
    root = os.path.dirname(os.path.dirname(os.path.abspath(nats_kernels.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    res = subprocess.run([sys.executable, "-c", _CUDA_EXT_CHECK], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (
        f"importing nats_kernels._cuda failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
    assert f"cuda kernels: {len(KERNEL_OPS)}" in res.stdout, res.stdout
