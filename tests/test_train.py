"""The main job's pieces: embedded datasets, design §6 metrics against closed forms, scheme
parsing, one tiny run of every scheme, and the ``train`` command's files."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from nats_kernels.train import (
    DATASETS,
    RunConfig,
    evaluate,
    frechet_distance,
    get_dataset,
    get_loss,
    js_to_uniform,
    mode_counts,
    parse_scheme,
    run,
)


def test_datasets_match_spec():
    ring = get_dataset("ring8").centres.double()
    assert ring.shape == (8, 2)
    torch.testing.assert_close(ring.norm(dim=1), torch.ones(8, dtype=torch.float64))
    assert torch.pdist(ring).min() > 0.7  # 8 distinct points: no duplicated endpoint
    torch.testing.assert_close(ring[2], torch.tensor([0.0, 1.0], dtype=torch.float64),
                               atol=1e-7, rtol=0)
    assert get_dataset("ring5").n_modes == 5
    grid = get_dataset("grid25")
    assert grid.n_modes == 25 and grid.std == 0.05
    assert set(grid.centres.flatten().tolist()) == {-4.0, -2.0, 0.0, 2.0, 4.0}
    cube = get_dataset("cube27")
    assert cube.centres.shape == (27, 3) and set(cube.centres.flatten().tolist()) == {-1, 0, 1}
    with pytest.raises(ValueError, match="dataset: unknown 'ring9'"):
        get_dataset("ring9")


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_samples_are_seeded_and_around_the_modes(name):
    mix = DATASETS[name]
    a = mix.sample(4000, torch.Generator().manual_seed(3))
    b = mix.sample(4000, torch.Generator().manual_seed(3))
    assert a.shape == (4000, mix.dim) and torch.equal(a, b)
    counts, assigned = mode_counts(a, mix)
    assert counts.sum() == assigned.sum()
    # a Gaussian point lies within 3 std of its centre with P(chi_dim < 3): 0.9889 in 2-D,
    # 0.9707 in 3-D
    expected = {2: 1 - math.exp(-4.5), 3: 0.97070911}[mix.dim]
    assert abs(float(assigned.double().mean()) - expected) < 0.012
    assert (counts > 0).all()
    # the spread around the nearest centre is the mixture's std
    nearest = mix.centres[torch.cdist(a, mix.centres).argmin(1)]
    assert abs(float((a - nearest).std()) - mix.std) < 0.1 * mix.std


def test_mode_counts_threshold_is_three_std():
    mix = get_dataset("ring8")
    c = mix.centres
    pts = torch.cat([c[:3], c[3:4] + torch.tensor([2.9 * mix.std, 0.0]),
                     c[4:5] + torch.tensor([0.0, 3.1 * mix.std])])
    counts, assigned = mode_counts(pts, mix)
    assert assigned.tolist() == [True, True, True, True, False]
    assert counts.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


def test_js_closed_forms():
    assert js_to_uniform(torch.tensor([5, 5, 5, 5])) == pytest.approx(0.0, abs=1e-12)
    K = 8
    # all mass in one mode: 0.5 log(2K/(K+1)) + 0.5 [(1/K) log(2/(K+1)) + (K-1)/K log 2]
    expected = 0.5 * math.log(2 * K / (K + 1)) + 0.5 * (
        math.log(2 / (K + 1)) / K + (K - 1) / K * math.log(2))
    assert js_to_uniform(torch.tensor([0, 0, 7, 0, 0, 0, 0, 0])) == pytest.approx(expected)
    assert js_to_uniform(torch.zeros(8, dtype=torch.long)) == pytest.approx(math.log(2))


def test_frechet_distance_closed_forms():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 2, generator=gen, dtype=torch.float64)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    shift = torch.tensor([0.3, -0.4], dtype=torch.float64)
    assert frechet_distance(x, x + shift) == pytest.approx(0.25, rel=1e-9)
    # scaled copies: covariances S and a^2 S commute, Tr(S + a^2 S - 2 a S) = (1 - a)^2 Tr(S)
    s = torch.cov(x.T).trace().item()
    m2 = float(x.mean(0).square().sum())
    assert frechet_distance(x, 3 * x) == pytest.approx(4 * s + 4 * m2, rel=1e-9)


def test_evaluate_perfect_and_collapsed():
    mix = get_dataset("ring8")
    gen = torch.Generator().manual_seed(1)
    real = mix.sample(2048, gen)
    good = evaluate(mix.sample(2048, gen), mix, real)
    assert good["modes"] == 8 and good["hq"] > 98 and good["js"] < 0.01 and good["fid"] < 0.01
    collapsed = mix.centres[0].expand(2048, 2).clone()
    bad = evaluate(collapsed, mix, real)
    assert bad["modes"] == 1 and bad["hq"] == 100.0 and bad["js"] > 0.4 and bad["fid"] > 1.0
    with pytest.raises(ValueError, match="equal counts"):
        evaluate(collapsed[:10], mix, real)


def test_parse_scheme():
    assert parse_scheme("cts") == ("cts", False, False)
    assert parse_scheme("nats+brc+aw") == ("nats", True, True)
    assert parse_scheme("annealed-cfg+aw") == ("annealed-cfg", True, False)
    for bad, msg in [("ctss", "unknown base"), ("cts+ew", "unknown modifier"),
                     ("nts+aw+aw", "repeated"), ("annealed-cfg+brc", "no generator loss")]:
        with pytest.raises(ValueError, match=msg):
            parse_scheme(bad)


def test_losses_real_fake_signs():
    hi, lo = torch.full((4, 1), 5.0), torch.full((4, 1), -5.0)
    for name in ("vanilla", "lsgan", "hinge", "wgan-gp"):
        loss = get_loss(name)
        # a discriminator that scores real high and fake low has the smaller loss
        assert loss.real(hi) + loss.fake(lo) < loss.real(lo) + loss.fake(hi), name
        # and the generator wants its fakes scored high
        assert loss.gen(hi) < loss.gen(lo), name
    with pytest.raises(ValueError, match="loss: unknown"):
        get_loss("bce")
    with pytest.raises(ValueError, match="logistic loss"):
        run(RunConfig(scheme="annealed-cfg", loss="hinge", steps=1))


TINY = dict(steps=5, batch=32, width=16, eval_samples=64, n_d=3, cfg_M=3, cfg_N=64, cfg_batch=32,
            cfg_x_epochs=2)


@pytest.mark.parametrize("scheme,loss", [
    ("cts", "vanilla"), ("nts", "hinge"), ("nats", "lsgan"), ("cts+aw", "vanilla"),
    ("nats+aw+brc", "wgan-gp"), ("cts+brc", "hinge"), ("annealed-cfg", "vanilla"),
    ("annealed-cfg+aw", "vanilla"),
])
def test_every_scheme_runs(scheme, loss):
    r = run(RunConfig(scheme=scheme, loss=loss, **TINY))
    for key in ("dataset", "loss", "scheme", "seed", "modes", "hq", "js", "fid",
                "seconds_per_step"):
        assert key in r
    assert r["samples"].shape == (64, 2) and torch.isfinite(r["samples"]).all()
    base = scheme.split("+")[0]
    # annealed-cfg trains whole stages of M = 3 D steps: 2 stages, each 2 epochs of 2 G batches
    assert r["d_steps"] == (6 if base == "annealed-cfg" else 5)
    if base == "annealed-cfg":
        assert r["g_steps"] == 2 * 2 * 2
    elif base == "cts":
        assert r["g_steps"] == 5
    elif base in ("nts", "nats"):  # outer iteration of n_d=3: D G D G G D G G G, cut at 5 D
        assert r["g_steps"] == 6 + 1 + 2
    # what the schemes logged on device: aw's case per D step, BRC's mean r
    assert ("aw_case_counts" in r) == ("+aw" in scheme)
    if "+aw" in scheme:
        assert len(r["aw_case_counts"]) == 5 and sum(r["aw_case_counts"]) == r["d_steps"]
    assert ("brc_mean_r" in r) == ("+brc" in scheme)
    if "+brc" in scheme:
        assert math.isfinite(r["brc_mean_r"])


def test_nats_weight_acts_on_the_output_or_on_the_loss():
    """nats_weight="output" (the NATS paper) trains on L_G(w * D(G(z))), "loss" on w * L_G: the
    same for WGAN's linear generator loss, different for the non-saturating one; with all
    weights 1 both are NTS."""
    def samples(**kw):
        return run(RunConfig(scheme="nats", **{**TINY, **kw}))["samples"]

    out, loss = samples(nats_weight="output"), samples(nats_weight="loss")
    assert not torch.allclose(out, loss, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(samples(loss="wgan-gp", nats_weight="output"),
                               samples(loss="wgan-gp", nats_weight="loss"), rtol=1e-4, atol=1e-5)
    ones = dict(w_first=1.0, w_last=1.0)
    assert torch.equal(samples(nats_weight="output", **ones), samples(nats_weight="loss", **ones))
    assert torch.equal(samples(nats_weight="output", **ones),
                       run(RunConfig(scheme="nts", **TINY))["samples"])


def test_run_is_seeded():
    a = run(RunConfig(scheme="nats+aw", seed=7, **TINY))
    b = run(RunConfig(scheme="nats+aw", seed=7, **TINY))
    c = run(RunConfig(scheme="nats+aw", seed=8, **TINY))
    assert torch.equal(a["samples"], b["samples"])
    assert not torch.equal(a["samples"], c["samples"])


def test_train_command_writes_results_and_figure(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-m", "nats_kernels", "train", "--steps", "3", "--batch", "32",
         "--eval-samples", "64", "--scheme", "cts", "nats+aw", "--dataset", "ring8", "cube27",
         "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    runs = json.loads((out / "results.json").read_text())
    assert [(r["dataset"], r["scheme"]) for r in runs] == [
        ("ring8", "cts"), ("ring8", "nats+aw"), ("cube27", "cts"), ("cube27", "nats+aw")]
    for r in runs:
        assert {"dataset", "loss", "scheme", "seed", "modes", "hq", "js", "fid",
                "seconds_per_step"} <= set(r)
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "modes" in res.stdout and "nats+aw" in res.stdout
    # a reading per nats+aw run, next to the cts run of its dataset
    readings = [line for line in res.stdout.splitlines() if "nats+aw: " in line]
    assert [line.split(",")[0].strip() for line in readings] == [
        "ring8 vanilla seed 0", "cube27 vanilla seed 0"]
    assert all("than cts" in line or "as many modes as cts" in line for line in readings)


@pytest.mark.parametrize("argv,message", [
    (["--scheme", "cts+xyz"], "unknown modifier 'xyz'"),
    (["--scheme", "cts", "annealed-cfg", "--loss", "hinge"], "annealed-cfg trains D on CFG"),
    (["--steps", "0"], "steps: expected >= 1"),
])
def test_train_command_rejects_bad_settings_before_training(tmp_path, argv, message):
    res = subprocess.run([sys.executable, "-m", "nats_kernels", "train", *argv,
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]
    assert "[1/" not in res.stdout + res.stderr  # no run started
    assert not (tmp_path / "results.json").exists()


# ---- nothing silently wrong: every setting (device and --out included) is checked before any
# ---- training and before --out is created; finished runs survive a later run's failure

FAST = ["--steps", "2", "--batch", "16", "--eval-samples", "16", "--no-progress"]


def _train(argv):
    from nats_kernels.__main__ import main

    return main(["train", *argv])


def _no_training(monkeypatch):
    import nats_kernels.train.cli as cli

    def must_not_run(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(cli, "run", must_not_run)


def _one_error_line(capsys, option):
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("nats-kernels train: error: ") and option in lines[0], lines[0]
    assert "[1/" not in out + err
    return lines[0]


@pytest.mark.parametrize("argv,option", [
    (["--device", "foo"], "--device"),
    (["--device", "meta"], "--device"),
    (["--lr-d", "-1"], "--lr-d"),
    (["--lr-g", "nan"], "--lr-g"),
    (["--lr-d", "inf"], "--lr-d"),
    (["--steps", "0"], "--steps"),
    (["--batch", "0"], "--batch"),
    (["--n-d", "0"], "--n-d"),
    (["--eval-samples", "0"], "--eval-samples"),
    (["--seed", "0", str(2**64)], "--seed"),
    # the first run would finish (annealed-cfg does not use lr_D), the second would fail
    (["--scheme", "annealed-cfg", "cts", "--lr-d", "-1"], "--lr-d"),
])
def test_train_bad_option_exits_2_before_creating_out(tmp_path, monkeypatch, capsys, argv,
                                                      option):
    _no_training(monkeypatch)
    out = tmp_path / "out"
    assert _train([*FAST, "--scheme", "cts", *argv, "--out", str(out)]) == 2
    _one_error_line(capsys, option)
    assert not out.exists()


def _fake_record(cfg) -> dict:
    """What run() returns (every setting, the metrics, the samples), without training."""
    from dataclasses import asdict

    return {**asdict(cfg), "betas": list(cfg.betas), "modes": 0, "n_modes": 8, "hq": 0.0,
            "js": 0.0, "fid": 0.0, "seconds_per_step": 0.0, "samples": torch.zeros(4, 2)}


def test_train_says_which_scheme_ignores_a_setting(tmp_path, monkeypatch, capsys):
    """annealed-cfg does not read --lr-d/--lr-g/--n-d, cts not --n-d: a changed value is noted
    on stderr (once per option) instead of being dropped without a word; defaults say nothing."""
    import nats_kernels.train.cli as cli

    monkeypatch.setattr(cli, "run", lambda cfg, progress=None: _fake_record(cfg))
    monkeypatch.setattr("nats_kernels.train.plot.plot_runs", lambda runs, path: path)
    out = str(tmp_path / "out")
    assert _train([*FAST, "--scheme", "annealed-cfg", "cts", "nats", "--lr-d", "1e-4",
                   "--n-d", "3", "--out", out]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("nats-kernels train: note:") for line in err)
    assert "--lr-d is not used by annealed-cfg (annealed-cfg trains both" in err[0]
    assert "--n-d is not used by annealed-cfg, cts (no nesting)" in err[1]
    assert _train([*FAST, "--scheme", "annealed-cfg", "--out", out]) == 0
    assert "note" not in capsys.readouterr().err


def test_train_nats_weight_option(tmp_path, monkeypatch, capsys):
    import nats_kernels.train.cli as cli

    seen = []
    monkeypatch.setattr(cli, "run", lambda cfg, **kw: seen.append(cfg) or _fake_record(cfg))
    monkeypatch.setattr("nats_kernels.train.plot.plot_runs", lambda runs, path: path)
    out = str(tmp_path / "out")
    assert _train([*FAST, "--scheme", "nats", "cts", "--nats-weight", "loss", "--out", out]) == 0
    assert [c.nats_weight for c in seen] == ["loss", "loss"]
    err = capsys.readouterr().err
    assert "--nats-weight is not used by cts (no annealed weight in its generator step)" in err
    with pytest.raises(SystemExit):
        _train([*FAST, "--nats-weight", "logit", "--out", out])


def test_train_device_without_gpu_exits_2(tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    for device in ("cuda", "cuda:0"):
        assert _train([*FAST, "--device", device, "--out", str(out)]) == 2
        assert "is not available" in _one_error_line(capsys, "--device")
    # a GPU is there, but not that one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _train([*FAST, "--device", "cuda:1", "--out", str(out)]) == 2
    _one_error_line(capsys, "--device")
    assert not out.exists()


def test_train_unusable_out_exits_2(tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch)
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    bad = [a_file, a_file / "sub"]
    if sys.platform.startswith("linux"):
        bad.append("/proc/nats-kernels-test")  # cannot be created, even by root
    for out in bad:
        assert _train([*FAST, "--out", str(out)]) == 2
        _one_error_line(capsys, "--out")
    assert a_file.read_text() == "keep me"


def _fail_on_run(monkeypatch, n, exc):
    """The runner's ``run``, raising ``exc`` on its n-th call, after a step of training."""
    import nats_kernels.train.cli as cli

    calls = []

    def flaky(cfg, progress=None):
        calls.append(cfg)
        if len(calls) == n:
            raise exc
        return run(cfg, progress)

    monkeypatch.setattr(cli, "run", flaky)
    return calls


def test_train_keeps_finished_runs_when_a_later_run_fails(tmp_path, monkeypatch, capsys):
    _fail_on_run(monkeypatch, 2, RuntimeError("boom"))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        _train([*FAST, "--scheme", "cts", "nats", "cts+aw", "--out", str(out)])
    records = json.loads((out / "results.json").read_text())
    assert [r["scheme"] for r in records] == ["cts"]
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "samples.png"]
    assert "1 finished run" in capsys.readouterr().err


def test_train_ctrl_c_keeps_finished_runs_and_exits_130(tmp_path, monkeypatch, capsys):
    _fail_on_run(monkeypatch, 3, KeyboardInterrupt())
    out = tmp_path / "out"
    try:
        rc = _train([*FAST, "--scheme", "cts", "nats", "cts+aw", "--out", str(out)])
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C escaped the command")
    assert rc == 130
    records = json.loads((out / "results.json").read_text())
    assert [r["scheme"] for r in records] == ["cts", "nats"]
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0] and "2 finished runs" in err[0], err


def test_train_results_json_is_replaced_atomically(tmp_path, monkeypatch):
    """A write that fails midway (disk full, Ctrl-C) leaves the previous results.json whole."""
    real_dump, real_dumps = json.dump, json.dumps

    def half_dump(obj, fp, **kwargs):
        if len(obj) == 2:
            fp.write(real_dumps(obj, **kwargs)[:20])
            raise OSError(28, "No space left on device")
        return real_dump(obj, fp, **kwargs)

    def half_dumps(obj, **kwargs):
        if len(obj) == 2:
            raise OSError(28, "No space left on device")
        return real_dumps(obj, **kwargs)

    # the json module itself: results.json is written by plot.write_json
    monkeypatch.setattr(json, "dump", half_dump)
    monkeypatch.setattr(json, "dumps", half_dumps)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space"):
        _train([*FAST, "--scheme", "cts", "nats", "--out", str(out)])
    monkeypatch.undo()
    records = json.loads((out / "results.json").read_text())
    assert [r["scheme"] for r in records] == ["cts"]
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "samples.png"]  # no temp


@pytest.mark.parametrize("change,name", [
    (dict(lr_d=-1.0), "lr_d"), (dict(lr_g=float("nan")), "lr_g"), (dict(cfg_lr=-1e-3), "cfg_lr"),
    (dict(device="foo"), "device"), (dict(seed=2**64), "seed"), (dict(betas=(0.9, 1.0)), "betas"),
    (dict(w_last=0.0), "w_last"), (dict(cfg_eta=float("inf")), "cfg_eta"),
    (dict(steps=2.5), "steps"), (dict(nats_weight="logit"), "nats_weight"),
])
def test_run_checks_every_setting_before_training(monkeypatch, change, name):
    import nats_kernels.train.runner as runner

    def must_not_build(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(runner, "mlp", must_not_build)
    with pytest.raises(ValueError, match=f"^{name}: "):
        run(RunConfig(**{**TINY, **change}))


# ---- data-parallel: --nproc N (and run() inside a process group of N ranks); one process is
# ---- the same as before

def test_one_process_run_is_unchanged():
    """No process group: rank 0's seeds, the whole batch, no DDP. Pinned to records taken
    before data-parallel training existed (a few rows of the evaluation samples; the tolerance
    only absorbs another CPU's rounding: a change of seeding or batch moves them entirely)."""
    from nats_kernels.train.runner import rank_seed

    want = {
        ("nats+aw+brc", "wgan-gp"): [[-0.15021753, -0.16303669], [-0.15754929, -0.07833643],
                                     [-0.04567410, 0.10267653]],
        ("cts", "vanilla"): [[-0.14837065, -0.11743878], [-0.21246448, -0.25192517],
                             [-0.12372059, -0.18878525]],
        ("annealed-cfg+aw", "vanilla"): [[-0.26244208, -0.33469698], [-0.26649487, -0.15673496],
                                         [-0.14053270, -0.15235981]],
    }
    for (scheme, loss), rows in want.items():
        r = run(RunConfig(scheme=scheme, loss=loss, seed=3, **TINY))
        assert r["nproc"] == 1 and r["batch"] == TINY["batch"]
        torch.testing.assert_close(r["samples"][:3], torch.tensor(rows), rtol=1e-4, atol=1e-5,
                                   msg=f"{scheme} {loss}")
    assert rank_seed(3, 0) == 3
    seeds = {rank_seed(s, r) for s in (0, 1, 2**64 - 2, -(2**63)) for r in range(1, 5)}
    assert len(seeds) == 16 and all(0 <= s <= 2**64 - 2 for s in seeds)


def test_check_config_splits_over_processes(monkeypatch):
    from nats_kernels.train.runner import check_config

    check_config(RunConfig(batch=64), world=4)
    with pytest.raises(ValueError, match=r"^batch: 64 does not split evenly over 3 processes"):
        check_config(RunConfig(batch=64), world=3)
    # annealed-cfg also splits its approximator's samples and batch
    check_config(RunConfig(batch=64, scheme="cts"), world=64)
    with pytest.raises(ValueError, match=r"^cfg_N: 640 does not split evenly over 3 proc"):
        check_config(RunConfig(batch=96, scheme="annealed-cfg"), world=3)
    with pytest.raises(ValueError, match=r"^cfg_batch: 64 does not split evenly over 5 proc"):
        check_config(RunConfig(batch=640, scheme="annealed-cfg"), world=5)
    with pytest.raises(ValueError, match=r"^world: "):
        check_config(RunConfig(), world=0)
    # several processes: a GPU each, so no one GPU named
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_config(RunConfig(device="cuda:1"), world=1)
    check_config(RunConfig(device="cuda"), world=2)
    with pytest.raises(ValueError, match=r"^device: 'cuda:1' names one GPU"):
        check_config(RunConfig(device="cuda:1"), world=2)


def _ranks_worker(rank, world):
    """run() on one rank of a gloo group: the networks it built, after training."""
    import nats_kernels.train.runner as runner

    built = []
    mlp = runner.mlp
    runner.mlp = lambda *a: built.append(mlp(*a)) or built[-1]
    out = []
    for scheme, loss in [("cts", "vanilla"), ("nats+aw+brc", "wgan-gp"),
                         ("annealed-cfg+aw", "vanilla")]:
        built.clear()
        r = run(RunConfig(scheme=scheme, loss=loss, **{**TINY, "steps": 6}))
        r["params"] = [p.detach().clone() for m in built for p in m.parameters()]
        out.append(r)
    return out


def test_run_in_a_process_group_keeps_the_ranks_identical():
    """2 gloo ranks: each draws its own data, the gradients are averaged, so both end with the
    same networks (and the same aw cases and BRC r); each evaluates its own samples."""
    from ranks import run as run_ranks

    r0, r1 = run_ranks(_ranks_worker, 2, timeout=240)
    for a, b in zip(r0, r1):
        what = a["scheme"]
        assert a["nproc"] == b["nproc"] == 2, what
        assert len(a["params"]) == 12 and all(
            torch.equal(p, q) for p, q in zip(a["params"], b["params"])), what
        assert not torch.equal(a["samples"], b["samples"]), what  # rank 1's own z
        assert a.get("aw_case_counts") == b.get("aw_case_counts"), what
        assert a.get("brc_mean_r") == b.get("brc_mean_r"), what
    # annealed-cfg: 2 stages of M = 3; each rank fits 64 / 2 samples in batches of 32 / 2
    assert r0[2]["d_steps"] == 6 and r0[2]["g_steps"] == 2 * 2 * 2


def _cli(argv, env=None, timeout=180):
    import os

    return subprocess.run([sys.executable, "-m", "nats_kernels", "train", *argv],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_train_nproc_2(tmp_path):
    """The real command with 2 CPU processes: one table, one results.json (rank 0's), the
    figure; the global batch split over the ranks."""
    out = tmp_path / "out"
    res = _cli(["--nproc", "2", "--scheme", "cts+aw", "cts+brc", "annealed-cfg+aw", "--steps",
                "15", "--batch", "64", "--eval-samples", "64", "--no-progress", "--out",
                str(out)])
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert res.stdout.count("dataset  loss") == 1 and res.stdout.count("\nwrote ") == 1
    for i in (1, 2, 3):
        assert res.stdout.count(f"[{i}/3]") == 1, res.stdout
    assert "Traceback" not in res.stderr and "nats-kernels train:" not in res.stderr
    runs = json.loads((out / "results.json").read_text())
    assert [r["scheme"] for r in runs] == ["cts+aw", "cts+brc", "annealed-cfg+aw"]
    for r in runs:
        assert r["nproc"] == 2 and r["batch"] == 64 and r["d_steps"] == 15, r
        assert 0 <= r["modes"] <= 8 and 0 <= r["hq"] <= 100
        assert all(math.isfinite(r[k]) and r[k] >= 0 for k in ("js", "fid", "wall_seconds"))
    assert sum(runs[0]["aw_case_counts"]) == 15 and math.isfinite(runs[1]["brc_mean_r"])
    assert runs[2]["g_steps"] == 10 * (640 // 2) // (64 // 2)  # N and batch per rank
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "samples.png"]


@pytest.mark.parametrize("argv,option", [
    (["--nproc", "0"], "--nproc: expected >= 1, got 0"),
    (["--nproc", "3", "--batch", "64"], "--batch: 64 does not split evenly over 3 processes"),
    (["--nproc", "3", "--batch", "96", "--scheme", "cts", "annealed-cfg"], "cfg_N: 640"),
])
def test_train_bad_nproc_exits_2_before_spawning(tmp_path, monkeypatch, capsys, argv, option):
    import nats_kernels.train.cli as cli

    _no_training(monkeypatch)
    monkeypatch.setattr(cli, "_spawn", lambda *a: pytest.fail("spawned"))
    out = tmp_path / "out"
    assert _train([*FAST, "--scheme", "cts", *argv, "--out", str(out)]) == 2
    _one_error_line(capsys, option)
    assert not out.exists()


def test_train_nproc_needs_a_gpu_each_and_matches_torchrun(tmp_path, monkeypatch, capsys):
    import torch.distributed as dist

    import nats_kernels.train.cli as cli

    _no_training(monkeypatch)
    monkeypatch.setattr(cli, "_spawn", lambda *a: pytest.fail("spawned"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    out = tmp_path / "out"
    assert _train([*FAST, "--device", "cuda", "--nproc", "2", "--out", str(out)]) == 2
    assert "need a GPU each, and there is 1 here" in _one_error_line(capsys, "--nproc")
    assert _train([*FAST, "--device", "cuda:0", "--nproc", "2", "--out", str(out)]) == 2
    assert "names one GPU" in _one_error_line(capsys, "--device")
    # under torchrun (WORLD_SIZE > 1) --nproc is 1 or WORLD_SIZE
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert _train([*FAST, "--nproc", "2", "--out", str(out)]) == 2
    assert "WORLD_SIZE=4" in _one_error_line(capsys, "--nproc")
    assert not out.exists()


@pytest.mark.parametrize("rank", [1, 0])
def test_train_nproc_failing_rank_ends_the_command(tmp_path, rank):
    """A rank that raises (the private test hook NATS_KERNELS_TRAIN_FAIL_RANK: after its first
    D step, while the other rank waits in a collective) ends the command at once: exit code 1,
    its traceback shown, the other rank stopped; nothing hangs."""
    out = tmp_path / "out"
    res = _cli([*FAST, "--steps", "50", "--batch", "32", "--nproc", "2", "--scheme", "cts",
                "--out", str(out)], env={"NATS_KERNELS_TRAIN_FAIL_RANK": str(rank)},
               timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    said = [i for i, line in enumerate(lines) if line.startswith("nats-kernels train:")]
    assert len(said) == 1, res.stderr
    assert lines[said[0]] == (
        f"nats-kernels train: failed during [1/1] ring8 vanilla cts seed 0 (process {rank} of "
        f"2; traceback below; the other processes were stopped); no run finished, nothing was "
        f"written")
    assert lines[said[0] + 1].startswith("Traceback")
    assert lines[-1] == (f"RuntimeError: rank {rank} fails on purpose "
                         f"(NATS_KERNELS_TRAIN_FAIL_RANK={rank}, a test hook)")
    assert "dataset  loss" not in res.stdout
    assert sorted(p.name for p in out.iterdir()) == []
