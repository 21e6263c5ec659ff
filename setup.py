"""Build the compiled backends of nats_kernels against the torch already installed.

Install with ``pip install --no-build-isolation -e .`` (or without ``-e``) so that the
extensions are compiled against *your* torch, not a fresh copy pip would fetch.

Switches (environment variables read at build time):

``NATS_KERNELS_SKIP_EXT=1``
    Build nothing: a pure-Python install; every op runs its PyTorch reference.
``NATS_KERNELS_SKIP_CUDA=1``
    Build only the C++ CPU extension, even where CUDA is available.
``NATS_KERNELS_FORCE_CUDA=1``
    Build the CUDA extension even when no GPU is visible (a CUDA toolkit and a CUDA-enabled
    torch are still required; the build fails loudly without them).
``NATS_KERNELS_NO_AVX2=1``
    Build the CPU kernels without ``-mavx2`` (added by default when the building machine has
    AVX2; no FMA contraction either way, so results are the same).
``TORCH_CUDA_ARCH_LIST``
    GPU architectures to compile for, e.g. ``"8.0;9.0"`` (default: torch's choice).
``MAX_JOBS``
    Parallel compile jobs used by ninja.
"""

from __future__ import annotations

import glob
import os
import platform
import sys

from setuptools import setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _say(msg: str) -> None:
    print(f"nats_kernels setup: {msg}", file=sys.stderr)


def _simd_flags() -> list[str]:
    """``-mavx2`` when the building machine has AVX2 (the documented install builds on the machine
    that runs the kernels): the streaming loops vectorize 8 floats wide instead of SSE2's 4.
    Not ``-mfma`` nor ``-march=native``: no multiply-add is contracted, so results round exactly
    as without the flag. ``NATS_KERNELS_NO_AVX2=1`` leaves it out (e.g. to build on one machine
    for older ones)."""
    if _flag("NATS_KERNELS_NO_AVX2") or platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return []
    if " avx2" not in flags:
        return []
    _say("building the CPU kernels with -mavx2 (this machine has AVX2; NATS_KERNELS_NO_AVX2=1 "
         "turns it off)")
    return ["-mavx2"]


def _extensions():
    if _flag("NATS_KERNELS_SKIP_EXT"):
        _say("NATS_KERNELS_SKIP_EXT=1: building no extension; ops use the PyTorch reference")
        return [], {}

    import torch
    from torch.utils import cpp_extension

    here = os.path.dirname(os.path.abspath(__file__))
    openmp = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
    cxx = ["-O3", "-std=c++17"] + (["-fopenmp"] if openmp else []) + _simd_flags()
    link = ["-fopenmp"] if openmp else []

    cpu_sources = ["csrc/nats_kernels.cpp"] + sorted(
        os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "cpu", "*.cpp"))
    )
    exts = [
        cpp_extension.CppExtension(
            "nats_kernels._C",
            cpu_sources,
            include_dirs=[os.path.join(here, "csrc", "include")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    ]

    cuda_sources = sorted(
        os.path.relpath(p, here)
        for pattern in ("*.cu", "*.cpp")
        for p in glob.glob(os.path.join(here, "csrc", "cuda", pattern))
    )
    force = _flag("NATS_KERNELS_FORCE_CUDA")
    if _flag("NATS_KERNELS_SKIP_CUDA"):
        _say("NATS_KERNELS_SKIP_CUDA=1: not building the CUDA extension")
    elif not cuda_sources:
        _say("no CUDA sources under csrc/cuda yet: building the CPU extension only")
    elif torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        why = "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit found"
        if force:
            raise RuntimeError(f"NATS_KERNELS_FORCE_CUDA=1 but {why}")
        _say(f"{why}: not building the CUDA extension (CUDA tensors use Triton or the reference)")
    elif not (force or torch.cuda.is_available()):
        _say("no GPU visible: not building the CUDA extension "
             "(NATS_KERNELS_FORCE_CUDA=1 forces it)")
    else:
        # --fmad=false: no float a * b + c is contracted into one FMA, so the kernels round like
        # the reference and the CPU kernels (the CUDA kernels spell their hot arithmetic with
        # *_rn intrinsics anyway; this covers the shared scalar code in nk/aw_rule.h).
        # .ci/nvcc_check compiles csrc/cuda/*.cu with these flags too.
        nvcc = ["-O3", "-std=c++17", "-lineinfo", "--fmad=false"]
        exts.append(
            cpp_extension.CUDAExtension(
                "nats_kernels._cuda",
                cuda_sources,
                include_dirs=[os.path.join(here, "csrc", "include")],
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                extra_link_args=link,
            )
        )
    _say("building " + ", ".join(e.name for e in exts))
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
