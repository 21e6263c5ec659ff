"""Build the compiled backends of nats_kernels against the torch already installed.

Install with ``pip install --no-build-isolation -e .`` (or without ``-e``) so that the
extensions are compiled against *your* torch, not a fresh copy pip would fetch.

The C++ standard and every flag torch's headers need come from ``torch.utils.cpp_extension``,
which picks them for the installed torch (C++20 for the torches CI tests); this file adds only
optimization and rounding flags (``CXX_FLAGS``, ``NVCC_FLAGS``). ``.ci/nvcc_check`` reads those
two lists and :func:`cuda_toolkit` from here, so the strict compile check and the build agree.

Switches (environment variables read at build time):

``NATS_KERNELS_SKIP_EXT=1``
    Build nothing: a pure-Python install; every op runs its PyTorch reference.
``NATS_KERNELS_SKIP_CUDA=1``
    Build only the C++ CPU extension, even where CUDA is available.
``NATS_KERNELS_FORCE_CUDA=1``
    Build the CUDA extension even when no GPU is visible. Fails loudly, instead of building the
    CPU extension only, when torch is a CPU build or the CUDA toolkit is missing or of another
    major version than torch's CUDA.
``NATS_KERNELS_NO_AVX2=1``
    Build the CPU kernels without ``-mavx2`` (added by default when the building machine has
    AVX2; no FMA contraction either way, so results are the same).
``CUDA_HOME`` (or ``CUDA_PATH``)
    The CUDA toolkit to build with. Default: the toolkit of the ``nvcc`` on ``PATH`` (asked from
    nvcc itself, so a wrapper script on ``PATH`` works), else ``/usr/local/cuda``.
``TORCH_CUDA_ARCH_LIST``
    GPU architectures to compile for, e.g. ``"8.0;9.0"`` (default: the visible GPUs', or, with
    none visible, the architectures torch itself was built for).
``MAX_JOBS``
    Parallel compile jobs used by ninja.
"""

from __future__ import annotations

import glob
import os
import platform
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# Flags added to what torch.utils.cpp_extension gives every extension (never a -std: torch's).
CXX_FLAGS = ["-O3"]
# --fmad=false: no float a * b + c is contracted into one FMA, so the kernels round like the
# reference and the CPU kernels (the CUDA kernels spell their hot arithmetic with *_rn
# intrinsics anyway; this covers the shared scalar code in nk/aw_rule.h).
NVCC_FLAGS = ["-O3", "-lineinfo", "--fmad=false"]


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


def _nvcc_output(nvcc: str, *args: str) -> str:
    try:
        res = subprocess.run([nvcc, *args], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return res.stdout + res.stderr


def cuda_toolkit() -> tuple[str | None, str | None, str]:
    """``(root, release, why)`` of the CUDA toolkit to build with.

    ``root`` holds ``bin/nvcc`` and ``include/cuda_runtime.h`` (both None with ``why`` saying
    what is missing). Order: ``CUDA_HOME`` / ``CUDA_PATH`` as set; else the toolkit the ``nvcc``
    on ``PATH`` reports for itself (``nvcc --dryrun`` prints its ``TOP``; torch's own guess,
    the parent of nvcc's folder, is wrong for a wrapper script such as ``/usr/local/bin/nvcc``);
    else ``/usr/local/cuda``. ``release`` is nvcc's ``major.minor``.
    """
    root = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    source = "CUDA_HOME" if os.environ.get("CUDA_HOME") else "CUDA_PATH"
    if root is None:
        nvcc = shutil.which("nvcc")
        if nvcc is not None:
            top = re.search(r"^#\$ TOP=(.+)$", _nvcc_output(nvcc, "--dryrun", "-E", "-x", "cu",
                                                            os.devnull), re.M)
            root = os.path.normpath(top.group(1).strip()) if top else os.path.dirname(
                os.path.dirname(os.path.realpath(nvcc)))
            source = f"the toolkit of {nvcc}"
        else:
            root, source = "/usr/local/cuda", "the default location (no nvcc on PATH)"
    nvcc = os.path.join(root, "bin", "nvcc")
    if not os.path.exists(os.path.join(root, "include", "cuda_runtime.h")) or not os.access(
        nvcc, os.X_OK
    ):
        return None, None, f"no CUDA toolkit (nvcc and cuda_runtime.h) at {root}, {source}"
    release = re.search(r"release (\d+\.\d+)", _nvcc_output(nvcc, "--version"))
    if release is None:
        return None, None, f"{nvcc} --version reports no release"
    return root, release.group(1), f"CUDA {release.group(1)} at {root} ({source})"


def _cuda_extension_wanted(torch) -> bool:
    """Whether to build nats_kernels._cuda; says why not. Raises under NATS_KERNELS_FORCE_CUDA=1
    when it cannot be built."""
    force = _flag("NATS_KERNELS_FORCE_CUDA")

    def skip(why: str) -> bool:
        if force:
            raise RuntimeError(f"NATS_KERNELS_FORCE_CUDA=1 but {why}")
        _say(f"{why}: not building the CUDA extension (CUDA tensors use Triton or the reference)")
        return False

    if _flag("NATS_KERNELS_SKIP_CUDA"):
        _say("NATS_KERNELS_SKIP_CUDA=1: not building the CUDA extension")
        return False
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU build")
    root, release, why = cuda_toolkit()
    if root is None:
        return skip(why)
    if release.split(".")[0] != torch.version.cuda.split(".")[0]:
        return skip(f"the toolkit is CUDA {release} but torch {torch.__version__} was built with "
                    f"CUDA {torch.version.cuda} (the major versions must match; set CUDA_HOME to "
                    f"a CUDA {torch.version.cuda.split('.')[0]}.x toolkit)")
    if not (force or torch.cuda.is_available()):
        _say("no GPU visible: not building the CUDA extension "
             "(NATS_KERNELS_FORCE_CUDA=1 forces it)")
        return False
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # cpp_extension derives the architectures from the visible GPUs, and with none it fails
        # (an IndexError deep inside it): use the ones torch itself was built for.
        archs = [a[3:] for a in torch.cuda.get_arch_list() if a.startswith("sm_")]
        if not archs:
            raise RuntimeError("NATS_KERNELS_FORCE_CUDA=1 without a visible GPU needs "
                               "TORCH_CUDA_ARCH_LIST, e.g. \"8.0;9.0\"")
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a[:-1]}.{a[-1]}" for a in archs)
        _say(f"no GPU visible and no TORCH_CUDA_ARCH_LIST: compiling for torch's own "
             f"architectures {os.environ['TORCH_CUDA_ARCH_LIST']}")
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported: point it at the toolkit
    # found above, whose nvcc and headers belong together.
    os.environ["CUDA_HOME"] = root
    _say(f"building the CUDA extension with {why}")
    return True


def _extensions():
    if _flag("NATS_KERNELS_SKIP_EXT"):
        _say("NATS_KERNELS_SKIP_EXT=1: building no extension; ops use the PyTorch reference")
        return [], {}

    import torch

    cuda_sources = sorted(
        os.path.relpath(p, HERE)
        for pattern in ("*.cu", "*.cpp")
        for p in glob.glob(os.path.join(HERE, "csrc", "cuda", pattern))
    )
    build_cuda = bool(cuda_sources) and _cuda_extension_wanted(torch)

    from torch.utils import cpp_extension

    if build_cuda and cpp_extension.CUDA_HOME != os.environ["CUDA_HOME"]:
        # Imported before this file set CUDA_HOME (by a setuptools plugin, say): same correction.
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    openmp = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
    cxx = CXX_FLAGS + (["-fopenmp"] if openmp else []) + _simd_flags()
    link = ["-fopenmp"] if openmp else []
    include = [os.path.join(HERE, "csrc", "include")]

    cpu_sources = ["csrc/nats_kernels.cpp"] + sorted(
        os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp"))
    )
    exts = [
        cpp_extension.CppExtension(
            "nats_kernels._C",
            cpu_sources,
            include_dirs=include,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    ]
    if build_cuda:
        exts.append(
            cpp_extension.CUDAExtension(
                "nats_kernels._cuda",
                cuda_sources,
                include_dirs=include,
                extra_compile_args={"cxx": cxx, "nvcc": NVCC_FLAGS},
                extra_link_args=link,
            )
        )
    _say(f"building {', '.join(e.name for e in exts)} against torch {torch.__version__}")
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


# setuptools runs this file as __main__; .ci/nvcc_check loads it under another name to read the
# flags and the toolkit lookup above without building anything.
if __name__ == "__main__":
    from setuptools import setup

    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
