"""setup.py's decisions about the CUDA extension, with a stand-in torch and stand-in toolkits
(shell scripts answering like nvcc), so every case of README's install table is checked here:
CPU torch, no toolkit, a toolkit of another major version, no GPU with and without
NATS_KERNELS_FORCE_CUDA=1, a wrapper nvcc on PATH."""

from __future__ import annotations

import os
import runpy
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

SETUP = runpy.run_path(str(Path(__file__).resolve().parent.parent / "setup.py"),
                       run_name="test_setup")
cuda_toolkit = SETUP["cuda_toolkit"]
wanted = SETUP["_cuda_extension_wanted"]


def fake_torch(cuda: str | None = "13.0", gpu: bool = False, archs=("sm_80", "sm_90")):
    return SimpleNamespace(
        __version__="2.14.1" + ("+cu130" if cuda else "+cpu"),
        version=SimpleNamespace(cuda=cuda),
        cuda=SimpleNamespace(is_available=lambda: gpu, get_arch_list=lambda: list(archs)),
    )


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def toolkit(root: Path, release: str = "13.0") -> Path:
    """A folder that looks like a CUDA toolkit: bin/nvcc answering --version and --dryrun,
    include/cuda_runtime.h."""
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    _script(root / "bin" / "nvcc", f"""
case "$1" in
  --version) echo "Cuda compilation tools, release {release}, V{release}.1" ;;
  --dryrun) echo "#\\$ TOP={root}/bin/.." >&2 ;;
esac
""")
    return root


@pytest.fixture
def env(monkeypatch, tmp_path):
    """No CUDA_HOME / CUDA_PATH / switches, and a PATH holding only tmp_path/path. Each name is
    set before it is deleted so that monkeypatch restores it, also where setup.py itself sets it
    (CUDA_HOME, TORCH_CUDA_ARCH_LIST)."""
    for name in ("CUDA_HOME", "CUDA_PATH", "TORCH_CUDA_ARCH_LIST", "NATS_KERNELS_FORCE_CUDA",
                 "NATS_KERNELS_SKIP_CUDA"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    (tmp_path / "path").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    return monkeypatch


def test_cuda_home_is_used_as_set(env, tmp_path):
    root = toolkit(tmp_path / "cuda-13.0")
    env.setenv("CUDA_HOME", str(root))
    assert cuda_toolkit()[:2] == (str(root), "13.0")


def test_a_wrapper_nvcc_on_path_leads_to_its_toolkit(env, tmp_path):
    """/usr/local/bin/nvcc as a script calling the real one: torch would guess /usr/local."""
    root = toolkit(tmp_path / "cuda-13.0")
    _script(tmp_path / "path" / "nvcc", f'exec {root}/bin/nvcc "$@"\n')
    found, release, why = cuda_toolkit()
    assert (found, release) == (str(root), "13.0") and "the toolkit of" in why


def test_no_toolkit(env, tmp_path):
    env.setenv("CUDA_HOME", str(tmp_path / "nothing"))
    root, release, why = cuda_toolkit()
    assert root is None and "no CUDA toolkit" in why and "nothing" in why


def test_cpu_torch_builds_no_cuda_extension_and_force_fails(env):
    assert wanted(fake_torch(cuda=None)) is False
    env.setenv("NATS_KERNELS_FORCE_CUDA", "1")
    with pytest.raises(RuntimeError, match="FORCE_CUDA=1 but torch .* is a CPU build"):
        wanted(fake_torch(cuda=None))


def test_missing_toolkit_skips_and_force_fails(env, tmp_path):
    env.setenv("CUDA_HOME", str(tmp_path / "nothing"))
    assert wanted(fake_torch(gpu=True)) is False
    env.setenv("NATS_KERNELS_FORCE_CUDA", "1")
    with pytest.raises(RuntimeError, match="no CUDA toolkit"):
        wanted(fake_torch(gpu=True))


def test_toolkit_of_another_major_version(env, tmp_path):
    env.setenv("CUDA_HOME", str(toolkit(tmp_path / "cuda-12.4", "12.4")))
    assert wanted(fake_torch(gpu=True)) is False
    env.setenv("NATS_KERNELS_FORCE_CUDA", "1")
    with pytest.raises(RuntimeError, match=r"CUDA 12\.4 but torch .* CUDA 13\.0"):
        wanted(fake_torch(gpu=True))


def test_no_gpu_needs_force(env, tmp_path):
    root = toolkit(tmp_path / "cuda-13.0")
    env.setenv("CUDA_HOME", str(root))
    assert wanted(fake_torch(gpu=False)) is False
    env.setenv("NATS_KERNELS_FORCE_CUDA", "1")
    assert wanted(fake_torch(gpu=False)) is True
    # torch's own architectures stand in for the missing GPU (cpp_extension would fail).
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0"
    assert os.environ["CUDA_HOME"] == str(root)


def test_gpu_builds_for_itself(env, tmp_path):
    root = toolkit(tmp_path / "cuda-13.0")
    _script(tmp_path / "path" / "nvcc", f'exec {root}/bin/nvcc "$@"\n')
    assert wanted(fake_torch(gpu=True)) is True
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ  # cpp_extension asks the visible GPU
    assert os.environ["CUDA_HOME"] == str(root)


def test_explicit_arch_list_and_skip_switch_are_respected(env, tmp_path):
    env.setenv("CUDA_HOME", str(toolkit(tmp_path / "cuda-13.0")))
    env.setenv("NATS_KERNELS_FORCE_CUDA", "1")
    env.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert wanted(fake_torch(gpu=False)) is True
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"
    env.setenv("NATS_KERNELS_SKIP_CUDA", "1")
    assert wanted(fake_torch(gpu=True)) is False
