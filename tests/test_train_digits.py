"""The digits benchmark inside ``train`` (design §6.4): the conv networks train under every
scheme, the record carries the image metrics, the command prints and draws them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from nats_kernels.train import RunConfig, run
from nats_kernels.train.cli import _table
from nats_kernels.train.digits import DIGITS_Z_DIM, DigitsGenerator
from nats_kernels.train.plot import image_grid

TINY = dict(dataset="digits", steps=4, batch=16, eval_samples=32, n_d=2, cfg_M=2, cfg_N=32,
            cfg_batch=16, cfg_x_epochs=1)


@pytest.mark.parametrize("scheme,loss", [("cts", "vanilla"), ("nats+aw+brc", "vanilla"),
                                         ("nts", "wgan-gp"), ("annealed-cfg", "vanilla")])
def test_every_scheme_trains_on_digits(scheme, loss):
    r = run(RunConfig(scheme=scheme, loss=loss, **TINY))
    assert r["n_modes"] == 10 and r["z_dim"] == DIGITS_Z_DIM
    assert 0 <= r["modes"] <= 10 and 0.0 <= r["hq"] <= 100.0
    assert r["fid"] > 0 and r["fid_features"] > 0
    assert r["samples"].shape == (32, 64)
    if scheme != "annealed-cfg":  # G's tanh images (annealed CFG then moves them along grad D)
        assert r["samples"].abs().max() <= 1.0


def test_digits_run_is_seeded_and_uses_the_conv_networks(monkeypatch):
    import nats_kernels.train.digits as digits

    built = []
    make = digits.make_networks

    def spy(z_dim=DIGITS_Z_DIM):
        G, D = make(z_dim)
        built.append((G, D))
        return G, D

    monkeypatch.setattr(digits, "make_networks", spy)
    a = run(RunConfig(seed=5, **TINY))
    b = run(RunConfig(seed=5, **TINY))
    assert torch.equal(a["samples"], b["samples"])
    assert len(built) == 2 and isinstance(built[0][0], DigitsGenerator)


def test_table_adds_the_feature_fid_for_digits():
    base = {"loss": "vanilla", "scheme": "cts", "seed": 0, "modes": 3, "hq": 50.0, "js": 0.1,
            "fid": 1.0, "seconds_per_step": 0.01}
    text = _table([{**base, "dataset": "digits", "n_modes": 10, "fid_features": 12.5},
                   {**base, "dataset": "ring8", "n_modes": 8}])
    head, _, digits_row, ring_row = text.splitlines()
    assert "feat fid" in head
    assert "12.500" in digits_row and "3/10" in digits_row
    assert ring_row.split()[-2] == "-"
    assert "feat fid" not in _table([{**base, "dataset": "ring8", "n_modes": 8}])


def test_image_grid_tiles_and_pads():
    x = torch.full((3, 64), -1.0)
    x[1] = 1.0
    g = image_grid(x.numpy(), rows=2, cols=2)
    assert g.shape == (17, 17)
    assert g[:8, 9:].min() == 1.0 and g[:8, :8].max() == 0.0  # image 1 white, image 0 background
    assert g[9:, 9:].max() == 0.0  # a tile past n stays background


def test_train_command_on_digits(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-m", "nats_kernels", "train", "--dataset", "digits", "--steps", "3",
         "--batch", "16", "--eval-samples", "32", "--scheme", "cts", "nts", "--betas", "0.5",
         "0.999", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = json.loads((out / "results.json").read_text())
    assert [r["scheme"] for r in runs] == ["cts", "nts"]
    assert all(r["betas"] == [0.5, 0.999] and "fid_features" in r for r in runs)
    assert "feat fid" in res.stdout and "nts: " in res.stdout
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
