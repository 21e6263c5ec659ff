"""Shared pieces of the benchmark suite (imported by ``conftest.py`` and every ``bench_*.py``).

- Size sets: ``NK_BENCH_SIZES=full`` (default: the issue's realistic sizes, minus the few
  median-distance combinations listed in ``bench_median.SKIP_IN_FULL``), ``all`` (the whole grid)
  or ``smoke`` (tiny sizes: the whole suite runs in seconds; ``tests/test_benchmarks_smoke.py``).
- Device: ``NK_BENCH_DEVICE=cpu`` (default) or ``cuda``: every input, baseline and roofline
  lives on that device. On ``cuda`` each timed call ends with ``torch.cuda.synchronize()``
  (:func:`timed`), the kernel providers are ``reference``, ``triton`` and ``cuda``, peak memory
  is the CUDA allocator's high-water mark, and the size sets add the GPU targets (100M+
  elements, the N = 50000 median). ``.ci/gpu_check`` runs the suite so.
- Providers: ``reference`` and ``cpu`` (``triton``, ``cuda`` on a GPU) are nats_kernels'
  backends, forced through the public op with ``NATS_KERNELS_BACKEND`` (the variable is read
  on every call, so the timed path is exactly the user's: validation, custom-op dispatch,
  kernel). ``cpu`` is parametrized only when the
  built extension implements every op of the benchmark; when it implements some of them,
  ``auto`` (the dispatcher's own mix of cpu and reference kernels) runs instead. The other
  providers are plain-PyTorch baselines written in each ``bench_*.py``.
- Rooflines: the memory bandwidth of this machine is measured in the same run as the op, with a
  plain ``torch.add(a, b, out=c)`` and a ``c.copy_(a)`` moving the op's own byte count (best of
  several repetitions, the better of the two), and, for ops with real arithmetic (the median's
  distances), the GEMM rate with a float32 ``torch.mm`` of the op's relevant shape.
  ``roofline_s = max(bytes / bandwidth, flops / gemm_rate)`` (bytes / bandwidth alone for the
  streaming ops), where
  bytes and flops are the minimum the *task* needs (the same number for every provider), so
  ``roofline_s / median_time`` is each provider's fraction of the roofline.
- Agreement: every benchmark runs its provider once outside the timed region, compares the result
  with the baseline's result of the same size (normwise relative error, asserted) and records
  the error and the peak extra resident memory of that call in ``extra_info``.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import time
from collections.abc import Callable, Sequence

import torch

import nats_kernels as nk

SIZES_ENV = "NK_BENCH_SIZES"
MODES = ("full", "all", "smoke")
BACKEND_ENV = "NATS_KERNELS_BACKEND"


def size_mode() -> str:
    mode = os.environ.get(SIZES_ENV, "full").strip().lower() or "full"
    if mode not in MODES:
        raise ValueError(f"{SIZES_ENV}={mode!r} is not one of {', '.join(MODES)}")
    return mode


def smoke() -> bool:
    return size_mode() == "smoke"


DEVICE_ENV = "NK_BENCH_DEVICE"


def _device() -> torch.device:
    name = os.environ.get(DEVICE_ENV, "cpu").strip().lower() or "cpu"
    if name not in ("cpu", "cuda"):
        raise ValueError(f"{DEVICE_ENV}={name!r} is not one of cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{DEVICE_ENV}=cuda but torch sees no CUDA device")
    return torch.device(name)


DEVICE = _device()
ON_GPU = DEVICE.type == "cuda"


def generator(seed: int) -> torch.Generator:
    """A seeded generator on the benchmark device (inputs are drawn where they live)."""
    return torch.Generator(DEVICE).manual_seed(seed)


def randn(shape, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=DEVICE) * scale


def uniform(shape, gen: torch.Generator) -> torch.Tensor:
    return torch.empty(shape, device=DEVICE).uniform_(-1, 1, generator=gen)


def timed(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` as the benchmark times it: on a GPU, until its kernels have finished."""
    if not ON_GPU:
        return fn

    def run():
        result = fn()
        torch.cuda.synchronize()
        return result

    return run


# ------------------------------------------------------------------------------------ providers


def kernel_providers(ops: Sequence[str]) -> list[str]:
    """``reference``, plus ``cpu`` when the C++ backend implements all of ``ops`` here, or
    ``auto`` (cpu where it has a kernel, reference elsewhere) when it implements some. On a GPU:
    ``reference`` and each of ``triton`` / ``cuda`` that is available with all of ``ops``."""
    info = nk.backends()
    out = ["reference"]
    if ON_GPU:
        return out + [b for b in ("triton", "cuda")
                      if info[b]["available"] and all(op in info[b]["ops"] for op in ops)]
    cpu = info["cpu"]
    have = [op for op in ops if op in cpu["ops"]]
    if cpu["available"] and len(have) == len(ops):
        out.append("cpu")
    elif cpu["available"] and have:
        out.append("auto")
    return out


def use_backend(monkeypatch, provider: str) -> None:
    """Route the public ops to ``provider``'s kernels (no-op for plain-PyTorch providers)."""
    if provider in ("reference", "cpu", "auto", "triton", "cuda"):
        monkeypatch.setenv(BACKEND_ENV, provider)
    else:
        monkeypatch.delenv(BACKEND_ENV, raising=False)


def cases(sizes: Sequence[tuple[str, object]], providers: Sequence[str]) -> list:
    """pytest params ``(label, size, provider)``, all providers of one size together (so one
    size's inputs are alive at a time), the baseline first in ``providers``."""
    import pytest

    return [pytest.param(label, size, p, id=f"{label}-{p}")
            for label, size in sizes for p in providers]


class SizeCache:
    """Inputs and the baseline's result of the current size; dropped when the size changes."""

    def __init__(self) -> None:
        self.key = None
        self.data: dict = {}

    def get(self, key, make: Callable[[], dict]) -> dict:
        if key != self.key:
            self.key, self.data = None, {}
            gc.collect()
            self.data = make()
            self.key = key
        return self.data


# ------------------------------------------------------------------------------------ rooflines


def _best(fn: Callable[[], object], min_reps: int = 5, budget_s: float = 0.5) -> float:
    fn = timed(fn)
    fn()
    best, spent, reps = float("inf"), 0.0, 0
    while reps < min_reps or (spent < budget_s and reps < 200):
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return best


_bw_cache: dict[int, dict] = {}
_gemm_cache: dict[tuple[int, int, int], float] = {}


def bandwidth(nbytes: int) -> dict:
    """Measured GB/s of ``torch.add(a, b, out=c)`` and ``c.copy_(a)`` moving ``nbytes`` in all."""
    if nbytes not in _bw_cache:
        budget = 0.05 if smoke() else 1.0
        n3 = max(nbytes // 12, 1024)
        a, b, c = (torch.rand(n3, device=DEVICE), torch.rand(n3, device=DEVICE),
                   torch.zeros(n3, device=DEVICE))
        add = 12 * n3 / _best(lambda: torch.add(a, b, out=c), 10, budget) / 1e9
        del a, b, c
        n2 = max(nbytes // 8, 1024)
        a, c = torch.rand(n2, device=DEVICE), torch.zeros(n2, device=DEVICE)
        copy = 8 * n2 / _best(lambda: c.copy_(a), 10, budget) / 1e9
        del a, c
        _bw_cache[nbytes] = {"bw_add_GBps": add, "bw_copy_GBps": copy, "bw_GBps": max(add, copy)}
    return _bw_cache[nbytes]


def gemm_rate(m: int, k: int, n: int) -> float:
    """Measured GFLOP/s of a float32 ``(m, k) @ (k, n)`` ``torch.mm`` (on a GPU in full float32:
    TF32 is off, as in the median's IEEE tiles)."""
    key = (m, k, n)
    if key not in _gemm_cache:
        a, b = torch.rand(m, k, device=DEVICE), torch.rand(k, n, device=DEVICE)
        out = torch.empty(m, n, device=DEVICE)
        t = _best(lambda: torch.mm(a, b, out=out), min_reps=3,
                  budget_s=0.05 if smoke() else 0.5)
        _gemm_cache[key] = 2 * m * k * n / t / 1e9
    return _gemm_cache[key]


def roofline(nbytes: int, flops: int, gemm_shape: tuple[int, int, int] | None = None) -> dict:
    """``extra_info`` fields of the roofline of a task moving ``nbytes`` and doing ``flops``.

    With ``gemm_shape`` (an ``(m, k, n)`` matmul standing for the task's arithmetic) the
    roofline is ``max(bytes / bandwidth, flops / gemm_rate)``; without it (streaming ops whose
    few FLOPs are fused multiply-adds on data read once) it is ``bytes / bandwidth``."""
    bw = bandwidth(nbytes)
    t_mem = nbytes / (bw["bw_GBps"] * 1e9)
    info = {"bytes": int(nbytes), "flops": int(flops), **bw,
            "gemm_GFLOPs": None, "gemm_shape": None, "roofline_s": t_mem, "bound": "memory"}
    if gemm_shape is not None:
        gemm = gemm_rate(*gemm_shape)
        t_flop = flops / (gemm * 1e9)
        info.update(gemm_GFLOPs=gemm, gemm_shape=list(gemm_shape),
                    roofline_s=max(t_mem, t_flop), bound="memory" if t_mem >= t_flop else "compute")
    return info


# -------------------------------------------------------------------------- agreement, memory


def _flat64(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().double().reshape(-1)
    return torch.cat([t.detach().double().reshape(-1) for t in x])


def rel_err(actual, expected) -> float:
    """Normwise relative error ``max|a - e| / max|e|`` over a tensor or a list of tensors."""
    a, e = _flat64(actual), _flat64(expected)
    assert a.shape == e.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(e.shape)}"
    scale = float(e.abs().max()) if e.numel() else 0.0
    return float((a - e).abs().max()) / max(scale, 1e-30) if e.numel() else 0.0


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def with_peak_memory(fn: Callable[[], object]) -> tuple[object, int | None]:
    """Run ``fn`` once; return its result and the peak resident memory it added, in bytes.

    Linux/glibc only: gives the free heap pages back to the OS (``malloc_trim(0)``, so that
    memory freed by earlier calls and kept by malloc is counted again when reused), resets the
    process's high-water mark (``/proc/self/clear_refs``, value 5), runs ``fn`` and reads
    ``VmHWM - VmRSS(before)``. Counts the pages the call touches, so buffers it allocates but
    never writes are not seen. None where this is not available. On a GPU: the CUDA caching
    allocator's peak over what was allocated before the call."""
    gc.collect()
    if ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - before
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status("VmRSS")
    except OSError:
        before = None
    result = fn()
    peak = _status("VmHWM")
    if before is None or peak is None:
        return result, None
    return result, max(peak - before, 0)


def _snapshot(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    return [t.detach().clone() for t in x]


def check_and_record(benchmark, *, op: str, label: str, provider: str, baseline: str,
                     run: Callable[[], object], baseline_run: Callable[[], object],
                     cache: dict, tol: float, roof: dict, peak_on_second_call: bool = True,
                     **extra) -> None:
    """Untimed: run ``provider`` once, assert agreement with the baseline's result of this size
    (kept in ``cache["expected"]``; computed with ``baseline_run`` when the baseline's own test
    did not run first), and fill ``benchmark.group`` and ``benchmark.extra_info``. Results are
    copied, so ``run`` may return a buffer that later calls overwrite. ``peak_extra_bytes`` is
    measured on a second untimed call (``peak_on_second_call=False``: on the first, for long
    calls; warm the op up elsewhere so its one-time initialization is not counted)."""
    if provider != baseline and "expected" not in cache:
        cache["expected"] = _snapshot(baseline_run())
    result, peak = with_peak_memory(run)
    if peak_on_second_call:     # the first call's one-time initialization is not the op's
        result = _snapshot(result)
        _, peak = with_peak_memory(run)
    if provider == baseline:
        cache["expected"] = _snapshot(result)
        err = 0.0
    else:
        err = rel_err(result, cache["expected"])
    del result
    assert err <= tol, (f"{op} [{label}] provider {provider} disagrees with {baseline}: "
                        f"relative error {err:.3e} > {tol:.0e}")
    benchmark.group = f"{op} {label}"
    benchmark.extra_info.update({
        "op": op, "size": label, "provider": provider, "baseline": baseline,
        "max_rel_err": err, "tol": tol,
        "peak_extra_bytes": peak, "threads": torch.get_num_threads(), **roof, **extra,
    })


# ------------------------------------------------------------------------------ tensor lists


def randn_list(shapes: Sequence[tuple], gen: torch.Generator, scale: float = 1.0) -> list:
    return [randn(s, gen, scale) for s in shapes]


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
