"""The digits benchmark (nats_kernels.train.digits): data, sampling, networks, the metrics'
classifier and its on-disk cache, and the metrics themselves."""

from __future__ import annotations

import copy
import gzip
import importlib.util
import math
import os
import types

import pytest
import torch
from torch import nn

from nats_kernels.train import digits
from nats_kernels.train.digits import (
    CONFIDENCE,
    DIGITS_Z_DIM,
    Digits,
    classifier,
    evaluate_digits,
    get_digits,
    make_networks,
    real_reference,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One classifier trained for the whole module in a fresh cache dir (the per-process
    instances reset), with the global RNG state before and after training it."""
    cache = tmp_path_factory.mktemp("digits-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NATS_KERNELS_CACHE", str(cache))
        mp.setattr(digits, "_CLASSIFIERS", {})
        mp.setattr(digits, "_REAL_FEATURES", {})
        threads = torch.get_num_threads()
        torch.manual_seed(1234)
        before = torch.get_rng_state()
        model = classifier()
        after = torch.get_rng_state()
        yield types.SimpleNamespace(model=model, cache=cache, before=before, after=after,
                                    threads=(threads, torch.get_num_threads()))


@pytest.fixture
def fresh_instances(monkeypatch):
    """No classifier in this process yet (restored after the test)."""
    monkeypatch.setattr(digits, "_CLASSIFIERS", {})
    monkeypatch.setattr(digits, "_REAL_FEATURES", {})


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _accuracy(model: nn.Module) -> float:
    d = get_digits()
    with torch.no_grad():
        return float((model(d.images).argmax(1) == d.labels).double().mean())


# --- data ------------------------------------------------------------------------------------


def test_data_shape_range_and_labels():
    d = get_digits()
    assert isinstance(d, Digits) and d.name == "digits"
    assert d.images.shape == (1797, 64) and d.images.dtype == torch.float32
    assert d.labels.shape == (1797,) and d.labels.dtype == torch.int64
    assert (d.dim, d.n_modes, d.image_shape) == (64, 10, (8, 8))
    counts = torch.bincount(d.labels, minlength=10)
    assert counts.numel() == 10 and int(counts.sum()) == 1797
    assert int(counts.min()) >= 170 and int(counts.max()) <= 190
    assert get_digits() is d  # loaded once


def test_pixel_scaling_is_exact():
    d = get_digits()
    raw = d.images * 8 + 8
    assert torch.equal(raw, raw.round())
    assert raw.min() == 0 and raw.max() == 16
    assert d.images.min() == -1 and d.images.max() == 1
    # the first row of sklearn's digits.csv.gz: a 0
    first = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0]
    assert raw[0, :16].tolist() == first and int(d.labels[0]) == 0


def test_sample_shape_device_determinism_and_rows():
    d = get_digits()
    x = d.sample(300, torch.Generator().manual_seed(5))
    assert x.shape == (300, 64) and x.dtype == torch.float32 and x.device.type == "cpu"
    y = d.sample(300, torch.Generator().manual_seed(5), device="cpu")
    assert torch.equal(x, y)
    assert not torch.equal(x, d.sample(300, torch.Generator().manual_seed(6)))
    # every drawn row is one of the images
    is_row = (x[:, None, :] == d.images[None]).all(-1).any(1)
    assert bool(is_row.all())
    # drawn with replacement over all images: many distinct ones in 2000 draws
    many = d.sample(2000, torch.Generator().manual_seed(0))
    assert torch.unique(many, dim=0).shape[0] > 1000


@pytest.fixture
def no_cached_digits():
    get_digits.cache_clear()
    yield
    get_digits.cache_clear()


def test_missing_sklearn_raises(monkeypatch, no_cached_digits):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(RuntimeError, match="pip install scikit-learn"):
        get_digits()


def test_missing_or_bad_file_raises(monkeypatch, tmp_path, no_cached_digits):
    spec = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(RuntimeError, match="pip install scikit-learn"):
        get_digits()
    (tmp_path / "datasets" / "data").mkdir(parents=True)
    with gzip.open(tmp_path / "datasets" / "data" / "digits.csv.gz", "wt") as f:
        f.write(",".join(["3"] * 64 + ["1"]) + "\n")  # a single row
    with pytest.raises(RuntimeError, match="1797"):
        get_digits()


# --- networks --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 64])
def test_network_shapes_and_range(n):
    torch.manual_seed(0)
    G, D = make_networks()
    z = 3 * torch.randn(n, DIGITS_Z_DIM)
    x = G(z)
    assert x.shape == (n, 64) and float(x.detach().abs().max()) <= 1
    assert D(x).shape == (n, 1)
    assert D(get_digits().images[:n]).shape == (n, 1)
    G8, _ = make_networks(8)
    assert G8(torch.randn(n, 8)).shape == (n, 64)


def test_networks_have_no_normalization_or_dropout():
    for net in make_networks():
        kinds = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                 nn.GroupNorm, nn.LayerNorm, nn.modules.dropout._DropoutNd)
        assert not any(isinstance(m, kinds) for m in net.modules())
        assert list(net.buffers()) == []
        x = torch.randn(5, net.z_dim if hasattr(net, "z_dim") else 64)
        assert torch.equal(net.train()(x), net.eval()(x))


def test_double_backward_through_d_on_g_output():
    torch.manual_seed(0)
    G, D = make_networks()
    x = G(torch.randn(16, DIGITS_Z_DIM))
    (grad,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
    penalty = (grad.norm(dim=1) - 1).square().mean()
    # D is piecewise linear: the penalty alone gives G zero gradients, so add G's own loss
    (penalty + D(x).mean()).backward()
    for net in (G, D):
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
        assert any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("z_dim", [0, -1, 2.5, "3", True, None])
def test_bad_z_dim(z_dim):
    with pytest.raises(ValueError, match="z_dim"):
        make_networks(z_dim)


# --- classifier and its cache ----------------------------------------------------------------


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("NATS_KERNELS_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert digits.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("NATS_KERNELS_CACHE")
    assert digits.cache_dir() == tmp_path / "x" / "nats_kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert digits.cache_dir() == tmp_path / "h" / ".cache" / "nats_kernels"


def test_classifier_trained_accurate_cached_and_rng_untouched(trained):
    model = trained.model
    assert torch.equal(trained.before, trained.after)  # the caller's RNG state is unchanged
    assert trained.threads[0] == trained.threads[1]  # and its thread count
    assert _accuracy(model) >= 0.99
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert sorted(os.listdir(trained.cache)) == [digits.CACHE_FILE]  # no temporary left over
    x = get_digits().images[:5]
    assert model.features(x).shape == (5, 128) and model(x).shape == (5, 10)
    assert classifier() is model and classifier(torch.device("cpu")) is model


def test_training_is_deterministic_even_under_inference_mode(trained):
    with torch.inference_mode():
        again = digits._train_classifier(get_digits())
    assert _state_equal(again, trained.model)


def test_fresh_process_loads_the_file(trained, monkeypatch, fresh_instances):
    def fail(_):
        raise AssertionError("retrained instead of loading the cache file")

    monkeypatch.setattr(digits, "_train_classifier", fail)
    before = torch.get_rng_state()
    loaded = classifier()
    assert torch.equal(torch.get_rng_state(), before)
    assert loaded is not trained.model and _state_equal(loaded, trained.model)
    x = get_digits().images
    with torch.no_grad():
        assert torch.equal(loaded(x), trained.model(x))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


@pytest.fixture
def counted_training(trained, monkeypatch):
    """_train_classifier replaced by a copy of the trained one, counting the calls."""
    calls = []

    def train(d):
        calls.append(d)
        return copy.deepcopy(trained.model).train().requires_grad_(True)

    monkeypatch.setattr(digits, "_train_classifier", train)
    return calls


def _wrong_weights(path):
    torch.manual_seed(0)
    torch.save({"format": digits._FORMAT, "state_dict": digits.DigitsClassifier().state_dict()},
               path)


@pytest.mark.parametrize("content", ["garbage", "empty", "other-keys", "wrong-weights"])
def test_bad_cache_file_is_retrained_and_replaced(content, trained, tmp_path, monkeypatch,
                                                  fresh_instances, counted_training):
    monkeypatch.setenv("NATS_KERNELS_CACHE", str(tmp_path))
    path = tmp_path / digits.CACHE_FILE
    if content == "garbage":
        path.write_bytes(b"not a torch file \x00\x01")
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "other-keys":
        torch.save({"format": digits._FORMAT, "state_dict": {"w": torch.zeros(3)}}, path)
    else:
        _wrong_weights(path)
    with pytest.warns(RuntimeWarning, match="retraining"):
        model = classifier()
    assert len(counted_training) == 1
    assert _accuracy(model) >= 0.99
    assert sorted(os.listdir(tmp_path)) == [digits.CACHE_FILE]
    # the replaced file now loads: a fresh process-level cache does not train again
    monkeypatch.setattr(digits, "_CLASSIFIERS", {})
    assert _state_equal(classifier(), trained.model) and len(counted_training) == 1


def test_unwritable_cache_dir_warns_but_works(tmp_path, monkeypatch, fresh_instances,
                                              counted_training):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("NATS_KERNELS_CACHE", str(blocker / "cache"))  # cannot be created
    with pytest.warns(RuntimeWarning, match="cannot cache"):
        model = classifier()
    assert len(counted_training) == 1 and _accuracy(model) >= 0.99
    assert classifier() is model and len(counted_training) == 1


# --- metrics ---------------------------------------------------------------------------------


def test_metrics_on_real_repeated_and_noise(trained):
    real = real_reference(512)
    assert set(real) == {"modes", "hq", "js", "fid", "fid_features"}
    assert isinstance(real["modes"], int)
    assert all(isinstance(real[k], float) for k in ("hq", "js", "fid", "fid_features"))
    assert real["modes"] == 10 and real["hq"] > 90 and real["js"] < 0.05
    assert 0 <= real["fid"] < 2 and 0 <= real["fid_features"] < 50

    one = evaluate_digits(get_digits().images[:1].repeat(512, 1))
    assert one["modes"] == 1 and one["js"] > 0.4
    assert one["fid"] > 20 * real["fid"] and one["fid_features"] > 20 * real["fid_features"]

    noise = torch.rand(512, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bad = evaluate_digits(noise)
    assert bad["fid"] > 20 * real["fid"] and bad["fid_features"] > 20 * real["fid_features"]
    assert bad["hq"] < real["hq"]


def test_metrics_counts_follow_confidence(trained):
    d = get_digits()
    x = torch.cat([d.images[d.labels == k][:20] for k in (3, 7)])
    m = evaluate_digits(x)
    with torch.no_grad():
        conf = trained.model(x).softmax(1).max(1).values
    assert m["modes"] == 2
    assert m["hq"] == pytest.approx(100 * float((conf >= CONFIDENCE).double().mean()))
    assert 0.2 < m["js"] < math.log(2)


def test_metrics_dtypes_and_gradients(trained):
    x = get_digits().sample(128, torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    ref = evaluate_digits(x)
    assert torch.get_num_threads() == threads
    m64 = evaluate_digits(x.double().requires_grad_(True))
    assert m64 == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert evaluate_digits(x.bfloat16())["modes"] >= 9


def test_metrics_non_finite_samples(trained):
    x = get_digits().images[:64].clone()
    x[3, 5] = float("nan")
    m = evaluate_digits(x)
    assert math.isnan(m["fid"]) and math.isnan(m["fid_features"])
    assert m["hq"] < 100


@pytest.mark.parametrize("bad", [
    torch.zeros(10, 63), torch.zeros(64), torch.zeros(1, 64), torch.zeros(2, 8, 8),
    torch.zeros(10, 64, dtype=torch.int64), [[0.0] * 64] * 4,
])
def test_metrics_bad_inputs(bad):
    with pytest.raises(ValueError, match="samples"):
        evaluate_digits(bad)


def test_real_reference_deterministic(trained):
    a, b = real_reference(200, seed=3), real_reference(200, seed=3)
    assert a == b
    assert real_reference(200, seed=4)["fid"] != a["fid"]
