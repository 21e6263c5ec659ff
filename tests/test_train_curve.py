"""``train`` runs beyond the final metrics: the curve (``eval_every``) leaves the training
untouched, the latent size follows the benchmark, and the printed readings next to cts say what
the numbers say (design §6.3)."""

from __future__ import annotations

import pytest
import torch

from nats_kernels.train import RunConfig, run
from nats_kernels.train.cli import _reading, _readings
from nats_kernels.train.runner import check_config, latent_size

TINY = dict(steps=6, batch=32, width=16, eval_samples=64, n_d=2, cfg_M=3, cfg_N=64, cfg_batch=32,
            cfg_x_epochs=2)


@pytest.mark.parametrize("scheme", ["cts", "nats+aw+brc", "annealed-cfg"])
def test_curve_does_not_change_the_run(scheme):
    """The curve's samples come from a generator of their own: the training draws, the final
    samples and metrics are those of the same run without a curve."""
    plain = run(RunConfig(scheme=scheme, **TINY))
    traced = run(RunConfig(scheme=scheme, eval_every=2, **TINY))
    assert "curve" not in plain
    assert torch.equal(plain["samples"], traced["samples"])
    for k in ("modes", "hq", "js", "fid"):
        assert plain[k] == traced[k], k
    steps = [p["step"] for p in traced["curve"]]
    # nested runs every 2 D steps; annealed-cfg at the ends of its stages (3 D steps) that are
    # multiples of 2, and at the end
    assert steps == ([3, 6] if scheme == "annealed-cfg" else [2, 4, 6])[-len(steps):]
    assert steps[-1] == 6
    for p in traced["curve"]:
        assert {"modes", "hq", "js", "fid"} <= set(p)


def test_curve_last_point_is_the_trained_generator():
    """The last point evaluates the final generator (other latents than the final metrics, so
    only close, not equal): a collapsed-or-not verdict cannot disagree by much."""
    r = run(RunConfig(scheme="cts", eval_every=3, **{**TINY, "eval_samples": 512}))
    assert abs(r["curve"][-1]["hq"] - r["hq"]) < 10.0
    assert r["curve"][-1]["fid"] == pytest.approx(r["fid"], rel=0.5, abs=0.05)


def test_eval_every_is_checked():
    with pytest.raises(ValueError, match="^eval_every: "):
        check_config(RunConfig(eval_every=-1))
    with pytest.raises(ValueError, match="^eval_every: "):
        check_config(RunConfig(eval_every=1.5))


def test_latent_size_follows_the_benchmark():
    assert latent_size(RunConfig()) == 2
    assert latent_size(RunConfig(z_dim=5)) == 5
    assert latent_size(RunConfig(dataset="digits")) == 32
    r = run(RunConfig(z_dim=3, **TINY))
    assert r["z_dim"] == 3
    with pytest.raises(ValueError, match="^z_dim: "):
        check_config(RunConfig(z_dim=0))


def _record(scheme, modes, fid, hq=50.0, **extra):
    return {"dataset": "ring8", "loss": extra.pop("loss", "vanilla"), "seed": 0, "steps": 10,
            "batch": 8, "lr_d": 1e-3, "lr_g": 1e-3, "scheme": scheme, "modes": modes,
            "n_modes": 8, "fid": fid, "hq": hq, "n_d": 5, "nats_weight": "output", **extra}


def test_readings_compare_with_the_cts_run_of_the_same_setting():
    cts = _record("cts", 8, 0.02, hq=48.0)
    runs = [cts, _record("nats", 1, 1.4),
            _record("cts+aw", 8, 0.03, hq=39.0, aw_case_counts=[0, 0, 10, 0, 90]),
            _record("cts+brc", 0, 0.8, brc_mean_r=-3.0),
            {**_record("nts", 3, 1.0), "seed": 1}]  # no cts run with seed 1: no reading
    lines = _readings(runs)
    assert len(lines) == 3
    assert "nats: fewer modes than cts (1/8 vs 8/8)" in lines[0]
    assert "15 G steps per 5 D steps" in lines[0] and "D's output" in lines[0]
    assert "as many modes as cts (8/8), FID x1.50" in lines[1]
    assert "case 5 (design §4) in 90%" in lines[1]
    # non-saturating loss: weights 1 + (r - 1) s_i turn negative above s = 1 / (1 - r) = 0.25
    assert "sigmoid above 0.25" in lines[2]


def test_brc_reading_for_wgan_names_the_gain():
    cts = _record("cts", 4, 0.5, loss="wgan-gp")
    assert "gain 1 + r < 0" in _reading(_record("cts+brc", 2, 0.9, loss="wgan-gp",
                                                brc_mean_r=-1.5), cts)
    assert "gain" not in _reading(_record("cts+brc", 5, 0.3, loss="wgan-gp",
                                          brc_mean_r=-0.5), cts)
    assert "more modes than cts (5/8 vs 4/8)" in _reading(_record("cts+brc", 5, 0.3,
                                                                  loss="wgan-gp",
                                                                  brc_mean_r=-0.5), cts)
