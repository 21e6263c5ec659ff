"""The Triton backend in the default ``pytest`` run, on a machine without a GPU.

* ``test_triton_suites_under_the_interpreter``: the triton-parametrized tests of the op and
  scheme suites, tests/test_aliasing.py and tests/test_triton.py, run in two concurrent
  subprocesses (``SHARDS``) with TRITON_INTERPRET=1 (Triton reads it when the kernels are
  defined, so it cannot be switched on inside this process). It fails if a subprocess fails,
  skips anything, or runs fewer tests than the suites hold today.
* ``test_kernels_compile_for_a_gpu``: the GPU path the interpreter does not take -- Triton's
  compiler (typing of the tuple arguments and the slot-selection branches, the float64
  annotations, do_not_specialize) down to a cubin for sm_90 -- by calling every launcher with
  CPU tensors under a stand-in driver that compiles each kernel variant and launches nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Tests the interpreted run must pass, per module (the counts of today's suites, slightly
# rounded down so that adding a case never breaks this; removing many of them does).
MINIMUM = {"test_cfg": 90, "test_multi_dot": 105, "test_aw_weights": 195,
           "test_aw_combine": 150, "test_aw_step": 12, "test_iga": 285,
           "test_iga_on_tiny_gans": 18, "test_aliasing": 25, "test_triton": 40,
           "test_median": 210, "test_triton_median": 20, "test_scheme_aw": 52,
           "test_scheme_brc": 13, "test_schemes_nested_cfg": 10, "test_aw_rule_thresholds": 32,
           "test_inplace_autograd": 20, "test_brc_solvers": 9}
# Triton cases of test_median.py left to a GPU run: each needs hours (N = 20000, d = 3072) or
# minutes (N = 12000 with recomputed tiles, the 1 MB-budget float64 count) of interpreted tiles.
# test_triton_median.py covers their code paths (recomputed vs stored keys) on small shapes.
INTERPRETER_TOO_SLOW = ("test_large_problem_default_budget", "test_workspace_stays_within_budget",
                        "test_medium_n_counts")
# One test per op that must be among them (the op suites' main oracle tests).
MUST_RUN = (
    "test_cfg_accumulate_matches_oracle",
    "test_cfg_step_matches_oracle",
    "test_multi_dot_matches_oracle",
    "test_aw_weights_table",
    "test_aw_combine_matches_oracle",
    "test_iga_ratio_matches_oracle",
    "test_iga_correction_matches_oracle",
    "test_opcheck_on_triton",
    "test_pairwise_matches_oracle",
    "test_cross_matches_oracle",
)


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("NATS_KERNELS_BACKEND", "TRITON_INTERPRET")}
    env.update(extra)
    return env


# The interpreted suites run as two pytest processes at once, one per shard (the interpreter is
# single-threaded Python: on the 2-core CI machine, 450 s in one process became 295 s and 241 s
# in two). The median's interpreted cases alone take about as long as all the other modules', so
# they are one shard and every other module of MINIMUM is the other.
MEDIAN_SHARD = ("test_median", "test_triton_median")
SHARDS = (MEDIAN_SHARD, tuple(m for m in MINIMUM if m not in MEDIAN_SHARD))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="already under the interpreter: the suites run directly")
def test_triton_suites_under_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    select = " and ".join(["triton", *(f"not {name}" for name in INTERPRETER_TOO_SLOW)])
    runs = []
    for i, shard in enumerate(SHARDS):
        report = tmp_path / f"report-{i}.xml"
        log = open(tmp_path / f"log-{i}.txt", "w+")  # closed below
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", *(f"tests/{m}.py" for m in shard), "-k", select,
             "-q", "-p", "no:cacheprovider", f"--junitxml={report}"],
            cwd=ROOT, env=_env(TRITON_INTERPRET="1"), stdout=log, stderr=subprocess.STDOUT,
            text=True,
        )
        runs.append((proc, log, report))
    tails, failed = [], []
    try:
        for proc, log, _ in runs:
            try:
                rc = proc.wait(timeout=1200)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = "timeout (1200 s)"
            log.seek(0)
            tail = log.read()[-6000:]
            tails.append(tail)
            if rc != 0:
                failed.append(f"exit {rc}:\n{tail}")
    finally:
        for proc, log, _ in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    assert not failed, "interpreted triton tests failed:\n" + "\n".join(failed)
    tail = "\n".join(tails)
    ran, per_module, names, seconds = 0, Counter(), set(), []
    for _, _, report in runs:
        root = ET.parse(report).getroot()
        seconds += [round(float(s.get("time", 0))) for s in root.iter("testsuite")]
        for case in root.iter("testcase"):
            bad = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
            assert not bad, f"{case.get('classname')}::{case.get('name')}: {bad}\n{tail}"
            ran += 1
            per_module[case.get("classname").rsplit(".", 1)[-1]] += 1
            names.add(case.get("name").split("[")[0])
    for module, least in MINIMUM.items():
        assert per_module[module] >= least, (
            f"only {per_module[module]} triton tests of {module} ran (expected >= {least})")
    missing = [n for n in MUST_RUN if n not in names]
    assert not missing, f"not run under the interpreter: {missing}"
    print(f"{ran} triton tests passed under TRITON_INTERPRET=1: {dict(per_module)}; the shards "
          f"took {seconds} s")


# A stand-in driver for Triton's JIT: every kernel launched after it compiles for an H100 (sm_90)
# and launches nothing; the launch names are printed at the end. The op-specific part follows.
COMPILE_ONLY_DRIVER = """
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

class CompileOnly:
    # What JITFunction.run asks of the driver; the target is an H100 (sm_90).
    def get_current_device(self):
        return 0
    def get_current_stream(self, device=None):
        return 0
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

driver.set_active(CompileOnly())
compiled = []
def getitem(self, grid):
    def run(*args, **kwargs):
        kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
        assert "cubin" in kernel.asm, sorted(kernel.asm)
        compiled.append(self.fn.__name__)
    return run
JITFunction.__getitem__ = getitem
"""


def compile_for_gpu(body: str, tmp_path) -> str:
    """Run ``body`` (launcher calls on CPU tensors) under the compile-only driver in a fresh
    process without TRITON_INTERPRET; return its stdout, which lists the compiled kernels."""
    triton = pytest.importorskip("triton")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend")
    script = (COMPILE_ONLY_DRIVER + textwrap.dedent(body)
              + '\nprint(len(compiled), "launches compiled:", sorted(set(compiled)))\n')
    res = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
        env=_env(TRITON_CACHE_DIR=str(tmp_path / "cache")), timeout=900,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    return res.stdout


OPS_BODY = """
    from nats_kernels.triton import aw, cfg, iga
    from nats_kernels.triton.cfg import MAX_LIST

    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        def r(*shape):
            return torch.randn(shape).to(dtype)
        a = [r(5, 7), r(3), r(), r(2, 6).t()]  # a contiguous and a strided launch group
        b = [r(5, 7), r(3), r(), r(6, 2)]
        dots = aw.multi_dot(a, b)
        iga.iga_ratio(a, b, 1e-12)
        w = torch.tensor(0.5)
        aw.aw_combine_([t.clone() for t in a], a, b, w, w)
        iga.iga_correction_([t.clone() for t in a], b, w)
        aw.aw_weights(dots.to(dtype), r(6), r(4, 3).t(), True, 0.5, 0.75, 0.05, 0.05)
        aw.aw_weights(dots.double(), r(6), torch.randn(5).double(), False, 0.5, 0.75, 0.05, 0.05)
        x, g = r(4, 6), r(3, 4, 6)
        weights, scale = torch.randn(3, dtype=torch.float64), torch.randn(3, 4)
        cfg.cfg_accumulate(x, g, weights, 0.3, scale, torch.empty_like(x))
        cfg.cfg_accumulate(x.t(), g.transpose(1, 2), weights, 0.3, None, torch.empty_like(x.t()))
        cfg.cfg_accumulate_list(x, list(g), weights, 0.3, scale, torch.empty_like(x))
        M = MAX_LIST + 2  # two passes through the scratch
        cfg.cfg_accumulate_list(x, [r(4, 6) for _ in range(M)], torch.randn(M), 0.3, None, x)
        cfg.cfg_step_(x, g[0], torch.tensor(0.5), 1.0, torch.randn(4))
"""


def test_kernels_compile_for_a_gpu(tmp_path):
    out = compile_for_gpu(OPS_BODY, tmp_path)
    kernels = {"_dots_partial_kernel", "_dots_final_kernel", "_combine_kernel",
               "_sigmoid_partial_kernel", "_aw_rule_kernel", "_cfg_stacked_kernel",
               "_cfg_list_kernel"}
    assert all(k in out for k in kernels), out


MEDIAN_BODY = """
    from nats_kernels.triton import median as m

    # Every variant the launcher produces: pairwise / cross, first pass storing or not, later
    # passes recomputing or over stored keys, the selects, for float32 and float64 work types
    # (float16 / bfloat16 inputs compute in float32: same kernels), both K steps (8, 32).
    for dtype in (torch.float32, torch.float64):
        for d, pairwise, budget in ((40, True, 2**30), (3, False, 2**30), (40, False, 1000),
                                    (3, True, 1000)):
            x = torch.randn(2, 40, d, dtype=dtype)
            y = None if pairwise else torch.randn(2, 30, d, dtype=dtype)
            m.median_pairwise_distance(x, y, budget == 1000, budget)
"""


def test_median_kernels_compile_for_a_gpu(tmp_path):
    out = compile_for_gpu(MEDIAN_BODY, tmp_path)
    for k in ("_tile_hist_kernel", "_stored_hist_kernel", "_select_kernel"):
        assert k in out, out
