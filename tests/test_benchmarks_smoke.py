"""The benchmark suite (benchmarks/) runs, agrees with its baselines and renders its results.

One subprocess runs the whole suite at ``NK_BENCH_SIZES=smoke`` (tiny sizes, one round each;
about 15 s on a 2-core CPU): every benchmark asserts, outside its timed region, that its provider
agrees with the baseline; this file checks the JSON it wrote and renders it with
``benchmarks/make_results.py`` into a temporary file (never over benchmarks/RESULTS.md).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OPS = ("cfg_accumulate", "aw step", "iga step", "median_pairwise_distance")
BASELINES = {"cfg_accumulate": "official_loop", "aw step": "official",
             "iga step": "per_tensor_item", "median_pairwise_distance": "cdist_median"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    path = out / "smoke.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("NATS_KERNELS_BACKEND", "NK_BENCH_NOTE", "NK_BENCH_MEDIAN_ROUNDS")}
    env["NK_BENCH_SIZES"] = "smoke"
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "-q",
           "-p", "no:cacheprovider", "--benchmark-min-rounds=1", "--benchmark-max-time=0",
           "--benchmark-warmup=off", f"--benchmark-json={path}"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return res, path, out


def test_smoke_suite_passes(smoke_run):
    res, path, _ = smoke_run
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert path.exists()


def test_every_provider_agrees_with_its_baseline(smoke_run):
    res, path, _ = smoke_run
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    benches = json.loads(path.read_text())["benchmarks"]
    seen = {}
    for b in benches:
        e = b["extra_info"]
        assert e["max_rel_err"] <= e["tol"], b["fullname"]
        assert e["baseline"] == BASELINES[e["op"]], b["fullname"]
        assert e["roofline_s"] > 0 and e["bytes"] > 0 and b["stats"]["median"] > 0
        seen.setdefault((e["op"], e["size"]), set()).add(e["provider"])
    assert {op for op, _ in seen} == set(OPS)
    for (op, size), providers in seen.items():
        assert {BASELINES[op], "reference"} <= providers, (op, size, providers)
        assert len(providers) >= 2


def test_make_results_renders_a_table_per_op(smoke_run):
    res, path, out = smoke_run
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    md = out / "RESULTS.md"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_results.py"), str(path),
                        "-o", str(md)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = md.read_text()
    assert "NK_BENCH_SIZES=smoke" in text and "torch " in text
    for op in OPS:
        assert f"## {op}" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    n_benches = len(json.loads(path.read_text())["benchmarks"])
    table_rows = [line for line in rows if line.count("|") == 10 and "`" in line]
    assert len(table_rows) == n_benches
    assert any("`official_loop` |" in line and "1.00x" in line for line in table_rows)


def test_distributed_benchmark_runs_and_counts_the_volume(tmp_path):
    """benchmarks/distributed.py on 1 and 2 gloo processes, one timed step: every row is there
    and the all-reduce volume the schemes send is what their docstrings say (aw: D's gradients
    twice plus six float64 statistics; BRC: D's twice plus G's once; one all-reduce per
    bucket)."""
    path = tmp_path / "dist.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "distributed.py"), "--nproc", "1", "2",
           "--steps", "1", "--models", "train MLP", "--json", str(path), "--md",
           str(tmp_path / "dist.md")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    rows = json.loads(path.read_text())["rows"]
    assert {(r["world"], r["step"]) for r in rows} == {
        (w, s) for w in (1, 2) for s in ("D plain", "D aw", "G plain", "G brc")}
    for r in rows:
        assert r["ms"] > 0
        if r["world"] == 1:
            assert r["allreduce_bytes"] == 0
            continue
        d, g = r["d_grad_bytes"], r["g_grad_bytes"]
        want = {"D plain": d, "D aw": 2 * d + 6 * 8, "G plain": g + d, "G brc": 2 * d + g}
        assert r["allreduce_bytes"] == want[r["step"]], r
        if r["step"] in ("D aw", "G brc"):
            assert r["our_allreduce_calls"] == 2, r  # one flat buffer each, plus stats / G
    assert "| 2 | train MLP | D aw |" in (tmp_path / "dist.md").read_text()


def test_brc_solvers_benchmark_runs(tmp_path):
    """benchmarks/brc_solvers.py with one timed step and one product: a row per dataset and
    step kind, a residual exactly for the two solvers, and the Markdown table."""
    path = tmp_path / "brc.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "brc_solvers.py"), "--steps", "1",
           "--iters", "1", "--json", str(path), "--md", str(tmp_path / "brc.md")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    rows = json.loads(path.read_text())["rows"]
    assert [(r["dataset"], r["kind"]) for r in rows] == [
        (d, k) for d in ("ring8-brc", "cube27-brc") for k in ("plain", "iga", "cg", "neumann")]
    for r in rows:
        assert r["seconds"] > 0
        assert (r["residual"] is not None) == (r["kind"] in ("cg", "neumann")), r
    assert "| ring8-brc | cg (1) |" in (tmp_path / "brc.md").read_text()
