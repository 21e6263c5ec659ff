"""``nats-kernels study`` (design §6.5): the plan of runs, resuming, the summary's arithmetic
and verdicts against published numbers, the files it writes, and its errors."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest

from nats_kernels.train import study
from nats_kernels.train.runner import RunConfig


def _args(tmp_path, **kw):
    p = argparse.ArgumentParser()
    study.add_arguments(p)
    argv = ["--out", str(tmp_path / "study"), "--no-progress"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", *(map(str, v) if isinstance(v, list) else [str(v)])]
    return p.parse_args(argv)


def _fake_record(cfg: RunConfig) -> dict:
    """A record shaped like run()'s, its numbers a function of the settings (cts+aw better
    than cts, the seed moving them), so that the summary has something to average."""
    good = cfg.scheme.endswith("aw")
    modes = 6 + 2 * good - cfg.seed
    curve = [{"step": s, "modes": modes, "hq": 40.0, "js": 0.1, "fid": 0.5 / s}
             for s in range(cfg.eval_every, cfg.steps + 1, cfg.eval_every)] \
        if cfg.eval_every else []
    return {"dataset": cfg.dataset, "loss": cfg.loss, "scheme": cfg.scheme, "seed": cfg.seed,
            "steps": cfg.steps, "modes": modes, "n_modes": 8, "hq": 40.0 + 10 * good,
            "js": 0.2 - 0.1 * good, "fid": 1.0 - 0.5 * good + 0.1 * cfg.seed,
            "seconds_per_step": 0.01, "wall_seconds": 0.01 * cfg.steps, "curve": curve,
            "samples": None}


@pytest.fixture
def fake_run(monkeypatch):
    calls = []

    def run(cfg, progress=None):
        calls.append(cfg)
        return _fake_record(cfg)

    monkeypatch.setattr(study, "run", run)
    return calls


def test_plan_trains_shared_runs_once(tmp_path):
    args = _args(tmp_path, protocol=["aw-ring8", "nested-ring8"], seeds=2)
    protocols, configs = study.plan(args)
    assert [p.name for p in protocols] == ["aw-ring8", "nested-ring8"]
    # cts on ring8 belongs to both: cts, cts+aw, nts, nats, for 2 seeds
    assert sorted((c.scheme, c.seed) for c in configs) == sorted(
        (s, seed) for s in ("cts", "cts+aw", "nts", "nats") for seed in (0, 1))
    assert len({study.run_key(c) for c in configs}) == len(configs)


def test_brc_protocol_uses_the_papers_settings(tmp_path):
    _, configs = study.plan(_args(tmp_path, protocol=["brc-table2"], seeds=1))
    assert {(c.dataset, c.loss, c.scheme) for c in configs} == {
        (d, lo, s) for d in ("ring8-brc", "cube27-brc") for lo in ("vanilla", "wgan-gp")
        for s in ("cts", "cts+brc")}
    assert all(c.lr_d == 1e-4 and c.lr_g == 1e-3 and c.batch == 512 for c in configs)


def test_run_key_names_the_run_and_hashes_every_setting():
    a = RunConfig(scheme="cts+aw", seed=2)
    assert study.run_key(a) == study.run_key(RunConfig(scheme="cts+aw", seed=2))
    assert study.run_key(a).startswith("ring8-vanilla-cts_aw-s2-")
    for change in (dict(steps=10), dict(lr_d=1e-4), dict(eval_every=5), dict(seed=3)):
        assert study.run_key(replace(a, **change)) != study.run_key(a), change


def test_study_resumes_and_retrains_a_cut_short_file(tmp_path, fake_run, capsys):
    args = _args(tmp_path, protocol=["aw-ring8"], seeds=3, steps=20, eval_every=5)
    assert study.main(args) == 0
    assert len(fake_run) == 6
    runs = sorted((tmp_path / "study" / "runs").glob("*.json"))
    assert len(runs) == 6
    assert "samples" not in json.loads(runs[0].read_text())
    # a second invocation trains nothing; a file cut short is trained again
    runs[0].write_text('{"dataset": "ri')
    fake_run.clear()
    assert study.main(args) == 0
    assert len(fake_run) == 1
    assert "5 already finished" in capsys.readouterr().err
    log = json.loads((tmp_path / "study" / "invocations.json").read_text())
    assert [i["trained"] for i in log] == [6, 1]
    # nothing left to train: the files are written again, the log keeps its two entries
    assert study.main(args) == 0
    assert len(json.loads((tmp_path / "study" / "invocations.json").read_text())) == 2
    assert "2 logged invocation(s)" in (tmp_path / "study" / "study.md").read_text()


def test_summary_means_and_verdicts(tmp_path, fake_run):
    args = _args(tmp_path, protocol=["aw-ring8"], seeds=3, steps=20, eval_every=5)
    assert study.main(args) == 0
    summary = json.loads((tmp_path / "study" / "study.json").read_text())["summaries"][0]
    rows = {r["scheme"]: r for r in summary["rows"]}
    # modes of seeds 0, 1, 2: 6, 5, 4 (cts) and 8, 7, 6 (cts+aw): mean and sample std
    assert rows["cts"]["modes"] == [5.0, 1.0]
    assert rows["cts+aw"]["modes"] == [7.0, 1.0]
    assert rows["cts"]["fid"][0] == pytest.approx(1.1)
    assert rows["cts"]["fid"][1] == pytest.approx(0.1)
    claims = {c["metric"]: c for c in summary["claims"]}
    assert claims["modes"]["direction_here"] == "better"
    assert claims["modes"]["verdict"] == "better here"
    assert claims["fid"]["paper_elsewhere"][:2] == [22.40, 19.08]
    text = (tmp_path / "study" / "study.md").read_text()
    assert "| ring8 | vanilla | cts+aw | 3 | 7.00 ± 1.00 / 8 |" in text
    assert "(x0.545); the paper, on SN-GAN, CIFAR-10 FID: 22.4 -> 19.08 (x0.85)" in text
    assert (tmp_path / "study" / "curves-aw-ring8.png").read_bytes()[:4] == b"\x89PNG"


def _verdict(plain, brc, metric="modes", dataset="ring8-brc"):
    """The verdict of BRC's claim on ``metric`` for seeds giving ``plain`` / ``brc``."""
    def rec(scheme, value, seed):
        r = {"dataset": dataset, "loss": "vanilla", "scheme": scheme, "seed": seed,
             "modes": 1, "n_modes": 8, "hq": 1.0, "js": 0.5, "fid": 1.0,
             "seconds_per_step": 0.1}
        r[metric] = value
        return r

    recs = [rec("cts", v, i) for i, v in enumerate(plain)] + \
           [rec("cts+brc", v, i) for i, v in enumerate(brc)]
    claims = study.summarize(study.PROTOCOLS["brc-table2"], recs)["claims"]
    (c,) = [c for c in claims if c["metric"] == metric and c["dataset"] == dataset]
    return c


def test_verdicts_against_published_numbers():
    assert _verdict([3, 4], [7, 8])["paper"] == [3.50, 7.50]
    assert _verdict([3, 4], [7, 8])["verdict"] == "reproduces"  # 7.5 within 7.5 ± 1
    assert _verdict([3, 4], [5, 5])["verdict"] == "same direction (better), not the published value"
    assert _verdict([3, 4], [2, 1])["verdict"] == "does not reproduce (paper: better; here: worse)"
    # a change no larger than the seed std (0.71 here) is not a change
    assert _verdict([3, 4], [4, 4])["verdict"] == (
        "does not reproduce (paper: better; here within seed noise)")
    # the paper's BRC made JS on the cube worse (0.48 -> 0.61): lowering it is not reproducing
    c = _verdict([0.60, 0.60], [0.50, 0.50], metric="js", dataset="cube27-brc")
    assert c["direction_in_paper"] == "worse" and c["direction_here"] == "better"
    assert c["verdict"] == "does not reproduce (paper: worse; here: better)"
    # a diverged run (NaN or huge) is printed, and never counts as an improvement
    c = _verdict([1.0, 1.2], [float("nan"), float("nan")], metric="fid")
    assert c["direction_here"] == "same"


def test_every_published_number_is_table_2():
    """The BRC paper's Table 2, VGAN and WGAN rows, as typed from the paper."""
    pub = study.PROTOCOLS["brc-table2"].published
    assert pub["ring8-brc", "vanilla", "cts"]["modes"] == (3.50, 1.00)
    assert pub["ring8-brc", "vanilla", "cts+brc"]["js"] == (0.40, 0.16)
    assert pub["ring8-brc", "wgan-gp", "cts+brc"]["fid"] == (0.16, 0.09)
    assert pub["cube27-brc", "vanilla", "cts+brc"]["modes"] == (23.00, 1.40)
    assert pub["cube27-brc", "wgan-gp", "cts"]["modes"] == (15.00, 0.41)
    assert pub["cube27-brc", "wgan-gp", "cts+brc"]["js"] == (0.21, 0.03)
    assert len(pub) == 8


def test_ctrl_c_keeps_finished_runs_and_exits_130(tmp_path, monkeypatch, capsys):
    calls = []

    def run(cfg, progress=None):
        calls.append(cfg)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return _fake_record(cfg)

    monkeypatch.setattr(study, "run", run)
    args = _args(tmp_path, protocol=["nested-ring8"], seeds=2, steps=10, eval_every=0)
    assert study.main(args) == 130
    assert len(list((tmp_path / "study" / "runs").glob("*.json"))) == 2
    assert "2 of 6 runs kept" in capsys.readouterr().err
    assert not (tmp_path / "study" / "study.md").exists()


@pytest.mark.parametrize("argv,message", [
    (["--seeds", "0"], "--seeds: expected >= 1"),
    (["--jobs", "0"], "--jobs: expected >= 1"),
    (["--steps", "0"], "--steps: expected >= 1"),
    (["--device", "nope"], "device: 'nope' is not a torch device"),
])
def test_bad_options_exit_2_before_training(tmp_path, fake_run, capsys, argv, message):
    from nats_kernels.__main__ import main

    assert main(["study", "--out", str(tmp_path / "s"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert fake_run == []


def test_study_in_worker_processes(tmp_path):
    """--jobs 2: real (tiny) runs in two spawned processes, files, summary and figure."""
    out = tmp_path / "st"
    res = subprocess.run(
        [sys.executable, "-m", "nats_kernels", "study", "--protocol", "combinations",
         "--seeds", "1", "--steps", "4", "--eval-every", "2", "--eval-samples", "64",
         "--jobs", "2", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert sorted(r["scheme"] for r in records) == ["nats", "nats+aw", "nats+brc"]
    assert all(r["threads"] == max(1, study._cpus() // 2) for r in records)
    assert all([p["step"] for p in r["curve"]] == [2, 4] for r in records)
    assert "## combinations" in res.stdout
    assert (out / "curves-combinations.png").exists()
    js = json.loads((out / "study.json").read_text())
    assert all(math.isfinite(r["fid"][0]) for r in js["summaries"][0]["rows"])
