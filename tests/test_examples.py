"""Smoke tests: each runnable example under python/ runs a few steps."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "python").glob("*.py"))


def test_examples_exist():
    assert EXAMPLES, "python/ holds the runnable examples"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path):
    res = subprocess.run([sys.executable, str(path), "--steps", "3"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_tour_runs_and_agrees():
    res = subprocess.run([sys.executable, "-m", "nats_kernels"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert "all ops agree" in res.stdout
    for op in ("cfg_accumulate", "median_pairwise_distance", "aw_combine_", "iga_correction_"):
        assert op in res.stdout
