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
