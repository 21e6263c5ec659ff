"""benchmarks/overhead.py keeps running: its --quick mode in a subprocess writes a row per op and
size with positive times (no timing is asserted: speed is a benchmark, not a test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_overhead_quick_run(tmp_path):
    out = tmp_path / "o.json"
    subprocess.run([sys.executable, "overhead.py", "--quick", "--json", str(out), "--md",
                    str(tmp_path / "o.md")], cwd=ROOT / "benchmarks", check=True, timeout=300,
                   capture_output=True)
    data = json.loads(out.read_text())
    ops = {r["op"] for r in data["rows"]}
    assert {"multi_dot", "iga_ratio", "aw_combine_", "iga_correction_", "cfg_step_",
            "aw_weights", "cfg_accumulate (M=15)", "median_pairwise_distance"} <= ops
    for r in data["rows"]:
        assert r["ours_s"] > 0 and r["foreach_mul_s"] > 0, r
        assert r["baseline_s"] is None or r["baseline_s"] > 0, r
    assert data["meta"]["backends"]["multi_dot"] == "cpu"
    assert "| multi_dot | tiny |" in (tmp_path / "o.md").read_text()
