""".ci/gpu_check's argument handling and its stop without a GPU, and the summary page it writes
(.ci/gpu_summary.py) from a JUnit report and a benchmark JSON. The GPU path itself runs only on
a GPU machine (see the script's header)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "gpu_check"


def gpu_check(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env=full, timeout=120)


def test_help_prints_usage():
    res = gpu_check("--help")
    assert res.returncode == 0 and res.stdout.startswith("usage: .ci/gpu_check OUTDIR")


@pytest.mark.parametrize("args", [(), ("a", "b"), ("-x",), ("",)],
                         ids=["none", "two", "option", "empty"])
def test_bad_arguments_exit_2_with_usage(args):
    res = gpu_check(*args)
    assert res.returncode == 2, res
    assert res.stderr.startswith("usage: .ci/gpu_check OUTDIR") and not res.stdout


def test_outdir_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "out"
    f.write_text("x")
    res = gpu_check(str(f))
    assert res.returncode == 2 and "is not a folder" in res.stderr, res


def test_without_a_gpu_it_stops_at_once_with_one_line(tmp_path):
    out = tmp_path / "out"
    res = gpu_check(str(out), CUDA_VISIBLE_DEVICES="")
    assert res.returncode == 3, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA GPU visible"), res.stderr
    assert "torch" in lines[0] and not res.stdout
    assert not out.exists()  # nothing written, nothing built


def test_without_torch_it_says_so(tmp_path):
    res = gpu_check(str(tmp_path / "out"), PYTHON="/bin/false")
    assert res.returncode == 3 and "no importable torch" in res.stderr, res


# ------------------------------------------------------------------------------- the summary

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="5" failures="1" errors="1" skipped="1">
<testcase classname="tests.test_gpu" name="test_a[cuda-triton]"/>
<testcase classname="tests.test_gpu" name="test_b[cuda-cuda]"><failure message="x"/></testcase>
<testcase classname="tests.test_gpu" name="test_c[cuda-cuda]"><error message="y"/></testcase>
<testcase classname="tests.test_gpu" name="test_d[cuda-cuda]"><skipped message="z"/></testcase>
<testcase classname="tests.test_gpu" name="test_e[cuda-cuda]"/>
</testsuite></testsuites>
"""


def summary(outdir: Path, *args: str) -> str:
    """Run .ci/gpu_summary.py on ``outdir``; return the SUMMARY.md it wrote."""
    res = subprocess.run([sys.executable, str(ROOT / ".ci" / "gpu_summary.py"), str(outdir),
                          *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return (outdir / "SUMMARY.md").read_text()


def _bench(op, size, provider, median, baseline, **extra):
    return {"stats": {"median": median, "iqr": 0.0, "rounds": 3},
            "extra_info": {"op": op, "size": size, "provider": provider,
                           "baseline": baseline, **extra}}


def test_summary_counts_tests_and_checks_the_gpu_targets(tmp_path):
    (tmp_path / "pytest.xml").write_text(JUNIT)
    benches = [
        # cfg at 128M: triton at 90% of its roofline (met), cuda at 50% (missed)
        _bench("cfg_accumulate", "128M", "triton", 1.0, "official_loop", roofline_s=0.9),
        _bench("cfg_accumulate", "128M", "cuda", 1.0, "official_loop", roofline_s=0.5),
        # median: triton 1.5x one GEMM (met), cuda 3x (missed)
        _bench("median_pairwise_distance", "N50000 d3072", "triton", 1.5, "cdist_median",
               roofline_s=0.1, gemm_same_size_s=1.0),
        _bench("median_pairwise_distance", "N50000 d3072", "cuda", 3.0, "cdist_median",
               roofline_s=0.1, gemm_same_size_s=1.0),
    ]
    (tmp_path / "bench-gpu.json").write_text(json.dumps({"benchmarks": benches}))
    page = summary(tmp_path, "--build", "0", "70", "--tests", "1", "150", "--bench", "124", "140")
    assert "5 tests: 2 passed, 1 failed, 1 errors, 1 skipped." in page
    assert "tests.test_gpu::test_b[cuda-cuda]" in page and "test_c[cuda-cuda]" in page
    assert "| build (both extensions, in place) | ok | 70 s |" in page
    assert "| tests on CUDA tensors | **failed** (exit 1) | 150 s |" in page
    assert "| GPU benchmarks | **stopped at its time limit** (exit 124) | 140 s |" in page
    rows = [line for line in page.splitlines() if line.startswith("| ") and "`" in line]
    assert "| cfg_accumulate | 128M | `triton` | >= 80% of roofline | 90.0% | yes |" in rows
    assert "| cfg_accumulate | 128M | `cuda` | >= 80% of roofline | 50.0% | **missed** |" in rows
    assert any("N50000 d3072 | `triton`" in r and r.endswith("(1.50x) | yes |") for r in rows)
    assert any("N50000 d3072 | `cuda`" in r and r.endswith("(3.00x) | **missed** |")
               for r in rows)
    assert sum("not run" in r for r in rows) == 6  # aw and iga at 134M, both providers;
    # AnnealedCFG.generate's two sizes (generate_graph)
    assert "| cfg generate | 784 M15 N640/64 | `generate_graph` | - | not in this run | not run |" \
        in rows
    assert "AnnealedCFG.generate (" not in page  # no such benchmark: no section


def test_summary_checks_the_cfg_generate_graph_target(tmp_path):
    benches = [
        # toy: the graph 4x faster than the port (met); 784: 2x (missed)
        _bench("cfg generate", "toy M15 N640/64", "official_port", 0.04, "official_port"),
        _bench("cfg generate", "toy M15 N640/64", "generate", 0.03, "official_port"),
        _bench("cfg generate", "toy M15 N640/64", "generate_graph", 0.01, "official_port"),
        _bench("cfg generate", "784 M15 N640/64", "official_port", 0.05, "official_port"),
        _bench("cfg generate", "784 M15 N640/64", "generate_graph", 0.025, "official_port"),
    ]
    (tmp_path / "bench-gpu.json").write_text(json.dumps({"benchmarks": benches}))
    page = summary(tmp_path, "--build", "0", "70", "--tests", "0", "150", "--bench", "0", "40")
    rows = page.splitlines()
    assert ("| cfg generate | toy M15 N640/64 | `generate_graph` | >= 3.0x vs `official_port` | "
            "4.00x | yes |") in rows
    assert ("| cfg generate | 784 M15 N640/64 | `generate_graph` | >= 3.0x vs `official_port` | "
            "2.00x | **missed** |") in rows
    assert not any("cfg generate" in r and ("`triton`" in r or "`cuda`" in r) for r in rows)
    assert "| toy M15 N640/64 | 40.00 ms | 30.00 ms | 10.00 ms | 4.00x | 3.00x |" in rows
    assert "| 784 M15 N640/64 | 50.00 ms | not run | 25.00 ms | 2.00x | - |" in rows


def test_summary_without_reports(tmp_path):
    page = summary(tmp_path, "--build", "1", "30", "--tests", "-1", "0", "--bench", "-1", "0")
    assert "| build (both extensions, in place) | **failed** (exit 1) | 30 s |" in page
    assert "| tests on CUDA tensors | did not run (the build failed) | 0 s |" in page
    assert "No JUnit report" in page and "No benchmark JSON" in page
