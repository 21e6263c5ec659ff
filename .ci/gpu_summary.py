"""Write OUTDIR/SUMMARY.md for .ci/gpu_check: one page from what the run left in OUTDIR.

usage: python .ci/gpu_summary.py OUTDIR --build RC SECONDS --tests RC SECONDS
                                 --bench RC SECONDS [--source PATH]

Reads OUTDIR/pytest.xml (JUnit) and OUTDIR/bench-gpu.json (pytest-benchmark) when they exist
and checks the GPU targets with benchmarks/make_results.py's ``target_rows``. An exit code of
-1 means the stage did not run (the build failed). Exit status: 0 when the page was written.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from make_results import fmt_time, target_rows  # noqa: E402

CFG_OP = "cfg generate"  # benchmarks/bench_cfg_generate.py
CFG_PROVIDERS = ("official_port", "generate", "generate_graph")


def junit_counts(path: Path) -> dict | None:
    """``{tests, passed, failures, errors, skipped}`` of a JUnit file; None if absent or
    unreadable (the test stage was killed before pytest wrote it)."""
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    c = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors",
                                                              "skipped")}
    c["passed"] = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    return c


def failed_tests(path: Path, limit: int = 20) -> list[str]:
    if not path.exists():
        return []
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return []
    out = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            out.append(f"{case.get('classname')}::{case.get('name')}")
    return out[:limit]


def _driver() -> str:
    if shutil.which("nvidia-smi") is None:
        return "unknown (no nvidia-smi)"
    res = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True)
    return res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout else "unknown"


def _environment() -> list[str]:
    try:
        import torch
    except ImportError as e:
        return [f"- torch: not importable ({e})"]
    lines = [f"- torch {torch.__version__}, built with CUDA {torch.version.cuda}; "
             f"Python {platform.python_version()}"]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.insert(0, f"- Device: **{p.name}** ({p.total_memory / 2**30:.0f} GiB, "
                        f"{p.multi_processor_count} multiprocessors, compute capability "
                        f"{p.major}.{p.minor}); driver {_driver()}")
    else:
        lines.insert(0, "- Device: no CUDA device visible to torch")
    try:
        import triton

        lines.append(f"- triton {triton.__version__}")
    except ImportError:
        lines.append("- triton: not importable")
    return lines


def _stage(name: str, rc: int, seconds: int) -> str:
    if rc == -1:
        state = "did not run (the build failed)"
    elif rc == 0:
        state = "ok"
    elif rc in (124, 130, 137):
        state = f"**stopped at its time limit** (exit {rc})"
    else:
        state = f"**failed** (exit {rc})"
    return f"| {name} | {state} | {seconds} s |"


def render(out: Path, stages: dict, source: str) -> str:
    lines = ["# GPU check", "",
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, from "
             f"`{source}` (`.ci/gpu_check`)", "", *_environment(), "",
             "| stage | result | time |", "|---|---|---|"]
    lines += [_stage(n, rc, s) for n, (rc, s) in stages.items()]
    counts = junit_counts(out / "pytest.xml")
    lines += ["", "## Tests on CUDA tensors (`pytest tests -k cuda`)", ""]
    if counts is None:
        lines.append("No JUnit report (see pytest.log).")
    else:
        lines.append(f"{counts['tests']} tests: {counts['passed']} passed, "
                     f"{counts['failures']} failed, {counts['errors']} errors, "
                     f"{counts['skipped']} skipped.")
        failed = failed_tests(out / "pytest.xml")
        if failed:
            lines += ["", "Failed (first 20):", *[f"- `{t}`" for t in failed]]
    lines += ["", "## GPU targets (benchmarks, `NK_BENCH_DEVICE=cuda`)", ""]
    bench = out / "bench-gpu.json"
    if not bench.exists():
        lines.append("No benchmark JSON (see bench.log).")
    else:
        data = json.loads(bench.read_text())
        benches = [b for b in data.get("benchmarks", []) if "op" in b.get("extra_info", {})]
        lines += [f"{len(benches)} benchmarks ran; the full table is RESULTS-gpu.md.", "",
                  "| op | size | provider | target | measured | met |",
                  "|---|---|---|---|---|---|"]
        for r in target_rows(benches, "cuda"):
            met = "not run" if r["ok"] is None else ("yes" if r["ok"] else "**missed**")
            lines.append(f"| {r['op']} | {r['size']} | `{r['provider']}` | {r['want']} | "
                         f"{r['got']} | {met} |")
        lines += cfg_generate_rows(benches)
    return "\n".join(lines) + "\n"


def cfg_generate_rows(benches: list[dict]) -> list[str]:
    """AnnealedCFG.generate's medians (bench_cfg_generate.py): the official loop's port, eager
    ``generate`` and ``cuda_graph=True``, with the graph's speed-up over both; [] if absent."""
    times: dict[str, dict[str, float]] = {}
    for b in benches:
        e = b["extra_info"]
        if e["op"] == CFG_OP and e["provider"] in CFG_PROVIDERS:
            times.setdefault(e["size"], {})[e["provider"]] = b["stats"]["median"]
    if not times:
        return []
    lines = ["", "## AnnealedCFG.generate (`bench_cfg_generate.py`, median of one call)", "",
             "| size | official port | eager generate | cuda_graph=True | graph vs port | "
             "graph vs eager |", "|---|---:|---:|---:|---:|---:|"]
    for size, t in times.items():
        cells = [fmt_time(t[p]) if p in t else "not run" for p in CFG_PROVIDERS]
        g = t.get("generate_graph")
        ratios = [f"{t[p] / g:.2f}x" if g and p in t else "-"
                  for p in ("official_port", "generate")]
        lines.append(f"| {size} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    for stage in ("build", "tests", "bench"):
        parser.add_argument(f"--{stage}", nargs=2, type=int, required=True,
                            metavar=("RC", "SECONDS"))
    parser.add_argument("--source", default=str(ROOT))
    args = parser.parse_args(argv)
    stages = {"build (both extensions, in place)": args.build,
              "tests on CUDA tensors": args.tests, "GPU benchmarks": args.bench}
    (args.outdir / "SUMMARY.md").write_text(render(args.outdir, stages, args.source))
    return 0


if __name__ == "__main__":
    sys.exit(main())
