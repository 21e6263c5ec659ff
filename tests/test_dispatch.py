"""The dispatch point, backend reporting, the custom-op registrations (opcheck) and the
behaviour without the compiled extension."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import make

import nats_kernels as nk
from nats_kernels import _dispatch

# The public ops, written out: the expectation the registry is checked against. All but
# annealed_weights are hot-path ops that compiled backends may implement.
OPS = (
    "annealed_weights",
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


def test_backends_report():
    info = nk.backends()
    assert list(info) == ["reference", "cpu", "triton", "cuda"]
    for name, entry in info.items():
        assert set(entry) == {"available", "reason", "ops"}, name
        assert isinstance(entry["reason"], str) and entry["reason"], name
    assert info["reference"]["available"]
    assert set(info["reference"]["ops"]) == set(OPS)
    assert set(_dispatch.KERNEL_OPS) == set(OPS) - {"annealed_weights"}
    if not torch.cuda.is_available():
        assert not info["cuda"]["available"] and "CUDA" in info["cuda"]["reason"]


@pytest.mark.skipif(os.environ.get("NATS_KERNELS_SKIP_EXT") == "1",
                    reason="installed as pure Python on purpose (NATS_KERNELS_SKIP_EXT=1)")
def test_cpu_extension_is_built_and_loads():
    """The README install builds the C++ extension; it must load and register its schemas."""
    import nats_kernels._C  # noqa: F401

    assert nk.backends()["cpu"]["available"], nk.backends()["cpu"]["reason"]
    from nats_kernels._dispatch import KERNEL_OPS

    for op in KERNEL_OPS:
        assert hasattr(torch.ops.nats_kernels_ext, op), op


@pytest.fixture
def fake_cpu_backend(monkeypatch):
    """A private copy of the registry with a recording 'cpu' kernel for multi_dot."""
    calls = []
    kernels = {b: dict(k) for b, k in _dispatch._kernels.items()}
    kernels["cpu"] = {"multi_dot": lambda a, b: calls.append("cpu") or torch.zeros(3)}
    monkeypatch.setattr(_dispatch, "_kernels", kernels)
    monkeypatch.setattr(_dispatch, "_unavailable", {})
    monkeypatch.delenv("NATS_KERNELS_BACKEND", raising=False)
    return calls


def test_auto_prefers_compiled_kernel_on_its_device(fake_cpu_backend):
    a = [torch.ones(3)]
    nk.multi_dot(a, a)
    assert fake_cpu_backend == ["cpu"]
    assert _dispatch.backend_name("multi_dot", "cpu") == "cpu"
    # an op the backend does not implement runs on the reference, without complaint
    assert _dispatch.backend_name("iga_ratio", "cpu") == "reference"
    assert _dispatch.backend_name("multi_dot", "meta") == "reference"


def test_override_reference_beats_compiled(fake_cpu_backend, monkeypatch):
    monkeypatch.setenv("NATS_KERNELS_BACKEND", "reference")
    a = [torch.ones(3)]
    assert torch.equal(nk.multi_dot(a, a), torch.full((3,), 3.0))
    assert fake_cpu_backend == []


def test_override_to_backend_without_the_op_is_an_error(fake_cpu_backend, monkeypatch):
    monkeypatch.setenv("NATS_KERNELS_BACKEND", "cpu")
    with pytest.raises(RuntimeError, match="no kernel for iga_ratio"):
        nk.iga_ratio([torch.ones(2)], [torch.ones(2)])


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
def test_annealed_weights_ignores_the_override(monkeypatch, backend):
    """A constructor of M numbers is no hot path: any NATS_KERNELS_BACKEND still builds it."""
    monkeypatch.setenv("NATS_KERNELS_BACKEND", backend)
    assert _dispatch.backend_name("annealed_weights", "cpu") == "reference"
    w = nk.annealed_weights(1.0, 0.01, 3, dtype=torch.float64)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.1, 0.01], dtype=torch.float64))


def test_override_to_wrong_device_is_an_error(monkeypatch):
    for backend in ("cuda", "triton"):
        monkeypatch.setenv("NATS_KERNELS_BACKEND", backend)
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match=f"NATS_KERNELS_BACKEND={backend}"):
            nk.multi_dot([torch.ones(2)], [torch.ones(2)])


def test_override_unknown_value(monkeypatch):
    monkeypatch.setenv("NATS_KERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="NATS_KERNELS_BACKEND='fastest'"):
        nk.multi_dot([torch.ones(2)], [torch.ones(2)])


def test_override_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setattr(_dispatch, "_unavailable", {"cpu": "not built in this test"})
    monkeypatch.setenv("NATS_KERNELS_BACKEND", "cpu")
    with pytest.raises(RuntimeError, match="not built in this test"):
        nk.multi_dot([torch.ones(2)], [torch.ones(2)])


def test_fallback_warns_once(monkeypatch):
    monkeypatch.delenv("NATS_KERNELS_BACKEND", raising=False)
    monkeypatch.setattr(_dispatch, "_unavailable", {"cpu": "simulated missing extension"})
    monkeypatch.setattr(_dispatch, "_warned", set())
    a = [torch.ones(2)]
    with pytest.warns(RuntimeWarning, match="simulated missing extension"):
        nk.multi_dot(a, a)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nk.multi_dot(a, a)


def test_import_and_ops_without_the_extension(tmp_path):
    """With nats_kernels._C unimportable, import works, backends() says why, ops fall back to
    the reference with one warning."""
    script = textwrap.dedent(
        """
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "nats_kernels._C":
                    raise ImportError("blocked by the test")
        sys.meta_path.insert(0, Block())
        import torch
        import nats_kernels as nk
        info = nk.backends()["cpu"]
        assert not info["available"] and "blocked by the test" in info["reason"], info
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            d = nk.multi_dot([torch.ones(3)], [torch.ones(3)])
            nk.multi_dot([torch.ones(3)], [torch.ones(3)])
        assert d.tolist() == [3.0, 3.0, 3.0], d
        assert len([w for w in caught if "cpu backend is unavailable" in str(w.message)]) == 1
        print("ok")
        """
    )
    env = {k: val for k, val in os.environ.items() if k != "NATS_KERNELS_BACKEND"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# ------------------------------------------------------------------------ custom-op registrations


def _opcheck_cases():
    x = make((4, 3), torch.float32)
    g = make((2, 4, 3), torch.float32, seed=1)
    a = [make((5,), torch.float32, seed=2), make((2, 3), torch.float32, seed=3)]
    b = [make((5,), torch.float32, seed=4), make((2, 3), torch.float32, seed=5)]
    ops = torch.ops.nats_kernels
    return {
        "annealed_weights": (ops.annealed_weights.default,
                             (1.0, 0.01, 5, torch.device("cpu"), torch.float32)),
        "cfg_accumulate": (ops.cfg_accumulate.default,
                           (x, g, torch.ones(2), 0.5, torch.ones(2, 4), torch.empty(4, 3))),
        "cfg_accumulate_list": (ops.cfg_accumulate_list.default,
                                (x, list(g), torch.ones(2), 0.5, None, torch.empty(4, 3))),
        "cfg_step_": (ops.cfg_step_.default, (x.clone(), g[0], torch.tensor(0.5), 1.0, None)),
        "median_pairwise_distance": (ops.median_pairwise_distance.default,
                                     (make((2, 9, 3), torch.float32), None, False, 1 << 20)),
        "multi_dot": (ops.multi_dot.default, (a, b)),
        "aw_weights": (ops.aw_weights.default,
                       (torch.tensor([2.0, 3.0, -1.0]), make((6,), torch.float32),
                        make((6,), torch.float32, seed=1), True, 0.5, 0.75, 0.05, 0.05)),
        "aw_combine_": (ops.aw_combine_.default,
                        ([t.clone() for t in a], a, b, torch.tensor(0.3), torch.tensor(0.7))),
        "iga_ratio": (ops.iga_ratio.default, (a, b, 1e-12)),
        "iga_correction_": (ops.iga_correction_.default,
                            ([t.clone() for t in a], b, torch.tensor(0.4))),
    }


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name, monkeypatch):
    monkeypatch.delenv("NATS_KERNELS_BACKEND", raising=False)
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


def test_compile_fullgraph_cfg():
    """The ops trace into one graph: no host sync and no graph break in the public functions."""

    def step(x0, grads, w, eta):
        y = nk.cfg_accumulate(x0, grads, w, eta=eta)
        return nk.cfg_step_(y, grads[0], w[0], eta=eta)

    x0 = make((4, 3, 5), torch.float32)
    grads = make((3, 4, 3, 5), torch.float32, seed=1)
    w = nk.annealed_weights(1.0, 0.01, 3)
    eta = torch.tensor(0.5)
    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(x0, grads, w, eta), step(x0, grads, w, eta))


def test_unbuilt_checkout_is_named_in_the_cpu_reason(tmp_path):
    """Running Python inside a checkout after a non-editable install imports the unbuilt
    source; the backend's reason says so instead of only 'not built'."""
    from nats_kernels._load import _unbuilt_checkout_hint

    pkg = tmp_path / "nats_kernels"
    pkg.mkdir()
    assert _unbuilt_checkout_hint(str(pkg)) == ""  # not a checkout: no setup.py beside it
    (tmp_path / "setup.py").write_text("")
    hint = _unbuilt_checkout_hint(str(pkg))
    assert f"source checkout {pkg}" in hint and "another folder" in hint
    (pkg / "_C.cpython-311-x86_64-linux-gnu.so").write_text("")
    assert _unbuilt_checkout_hint(str(pkg)) == ""  # built in place (editable): no hint
