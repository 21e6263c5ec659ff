"""benchmarks/steps.py (the per-step cost of the aw and BRC schemes) runs and writes its results.

One subprocess runs ``benchmarks/steps.py --quick`` (tiny networks and batches, three timed
rounds; about 10 s on a 2-core CPU) into a temporary folder. The script checks, outside its
timed region, that the aw and BRC steps agree with the reference backend and with autograd
(it exits non-zero otherwise); this file checks the JSON and Markdown it wrote: every family
and step with a positive time, a verdict per scheme. No timing is asserted.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("train MLP", "SN-GAN 32", "DCGAN 32")
STEPS = ("D plain", "D aw", "D 2-pass", "G plain", "G brc", "G 2-pass")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("steps") / "steps-quick"
    env = {k: v for k, v in os.environ.items() if k != "NATS_KERNELS_BACKEND"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "steps.py"), "--quick", "--threads", "1",
           "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return res, out


def test_quick_run_writes_json_and_markdown(quick_run):
    res, out = quick_run
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert Path(f"{out}.json").exists() and Path(f"{out}.md").exists()
    assert "| family | scheme | plain ms |" in res.stdout  # the tables are printed too


def test_every_family_and_step_has_a_positive_time(quick_run):
    res, out = quick_run
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    data = json.loads(Path(f"{out}.json").read_text())
    meta = data["meta"]
    assert meta["quick"] and meta["threads"] == 1 and meta["reps"] >= 1
    assert meta["torch"] and meta["machine"] and "--quick" in meta["command"]
    assert [(r["family"], r["step"]) for r in data["rows"]] == [
        (f, s) for f in FAMILIES for s in STEPS]
    for r in data["rows"]:
        assert r["ms"] > 0 and r["min_ms"] > 0, r
        assert len(r["times_ms"]) == meta["reps"] and all(t > 0 for t in r["times_ms"]), r
    assert [(v["family"], v["scheme"]) for v in data["verdicts"]] == [
        (f, s) for f in FAMILIES for s in ("aw", "brc")]
    for v in data["verdicts"]:
        assert v["plain_ms"] > 0 and v["scheme_ms"] > 0 and v["inherent_ms"] > 0, v
        assert isinstance(v["ok"], bool)
    for fam in data["families"]:
        assert fam["d_params"] > 0 and fam["g_params"] > 0 and fam["batch"] > 0
        for scheme in ("aw", "brc"):
            c = fam["checks"][scheme]
            assert c["finite"] and c["rel_err_vs_reference"] <= 1e-4, (fam["family"], c)
            assert c["rel_err_vs_autograd"] <= 1e-4, (fam["family"], c)


def test_markdown_has_every_row(quick_run):
    res, out = quick_run
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    md = Path(f"{out}.md").read_text()
    assert "torch " in md and "threads" in md and "benchmarks/steps.py --quick" in md
    lines = md.splitlines()
    for f in FAMILIES:
        for s in STEPS:
            assert any(line.startswith(f"| {f} |") and f"| {s} |" in line for line in lines), s
        for scheme in ("aw", "brc"):
            assert sum(line.startswith(f"| {f} | {scheme} |") for line in lines) == 2  # + check
