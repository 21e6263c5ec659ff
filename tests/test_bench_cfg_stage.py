"""benchmarks/cfg_stage.py (AnnealedCFG's stage and generate against a port of the official loop)
runs in its ``--quick`` form and writes its JSON and Markdown reports.

One subprocess, toy model and the 784-d model at 1 thread, tiny settings (M = 3, N = 128, two
epochs, two repetitions): the script itself asserts, outside its timed region, that AnnealedCFG
and the port agree on a stage and a generate from the same state and seed. No timing is
asserted here (the machine running the tests may be busy); only that the numbers are there.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cfg_stage_quick_writes_reports(tmp_path):
    stem = tmp_path / "cfg-stage"
    env = {k: v for k, v in os.environ.items() if k != "NATS_KERNELS_BACKEND"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cfg_stage.py"), "--quick", "--threads",
           "1", "--out", str(stem), "--note", "test run"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]

    data = json.loads(Path(f"{stem}.json").read_text())
    meta, rows = data["meta"], data["rows"]
    for key in ("date", "machine", "torch", "python", "command", "settings", "note",
                "agreement", "targets", "all_targets_met"):
        assert key in meta, key
    assert meta["quick"] is True and meta["note"] == "test run"
    assert "--quick" in meta["command"]
    assert meta["targets"] == {"toy": 1.3, "784": 1.0}
    assert set(meta["agreement"]) == {"toy", "784"}
    for a in meta["agreement"].values():
        assert a["max_rel_diff"] <= 1e-5 and isinstance(a["bit_identical"], bool)

    assert [(r["model"], r["threads"]) for r in rows] == [("toy", 1), ("784", 1)]
    for r in rows:
        assert isinstance(r["stage_target_met"], bool)
        for what in ("stage", "generate"):
            x = r[what]
            assert x["annealed_cfg_s"] > 0 and x["official_port_s"] > 0
            assert x["speedup"] > 0 and x["paired_speedup"] > 0
            assert len(x["annealed_cfg_all_s"]) == len(x["official_port_all_s"]) == 2

    md = Path(f"{stem}.md").read_text()
    assert "AnnealedCFG stage vs the official loop" in md and "torch " in md
    assert "| toy | 1 | stage |" in md and "| 784 | 1 | generate |" in md
    assert meta["machine"] in md


def _bench_generate(tmp_path, **env_extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("NATS_KERNELS_BACKEND", "NK_BENCH_DEVICE", "NK_BENCH_CFG_GENERATE")}
    env.update(OMP_NUM_THREADS="1", NK_BENCH_SIZES="smoke", **env_extra)
    path = tmp_path / "gen.json"
    cmd = [sys.executable, "-m", "pytest", "benchmarks/bench_cfg_generate.py", "--benchmark-only",
           "-q", "-p", "no:cacheprovider", "--benchmark-min-rounds=1", "--benchmark-max-time=0",
           "--benchmark-warmup=off", f"--benchmark-json={path}"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return res, path


def test_generate_benchmark_is_skipped_on_the_cpu(tmp_path):
    res, _ = _bench_generate(tmp_path)
    # 5: pytest's "no tests ran" (a module skipped at import); in the suite it is one skip
    assert res.returncode == 5 and "1 skipped" in res.stdout, (res.stdout + res.stderr)[-4000:]


def test_generate_benchmark_runs_on_the_cpu_when_asked(tmp_path):
    """bench_cfg_generate.py (the GPU check's AnnealedCFG.generate benchmark) with
    NK_BENCH_CFG_GENERATE=1: the port and eager generate (no graph provider on the CPU) agree,
    and make_results renders the op."""
    res, path = _bench_generate(tmp_path, NK_BENCH_CFG_GENERATE="1")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    benches = json.loads(path.read_text())["benchmarks"]
    seen = {(b["extra_info"]["size"], b["extra_info"]["provider"]) for b in benches}
    assert seen == {(f"{m} M3 N40/16", p) for m in ("toy", "784")
                    for p in ("official_port", "generate")}
    for b in benches:
        e = b["extra_info"]
        assert e["op"] == "cfg generate" and e["baseline"] == "official_port"
        assert e["max_rel_err"] <= e["tol"] and e["roofline_s"] > 0
        assert e["graph_captures"] is None
    out = tmp_path / "RESULTS.md"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_results.py"),
                          str(path), "-o", str(out)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "AnnealedCFG.generate, eager and cuda_graph=True" in out.read_text()
