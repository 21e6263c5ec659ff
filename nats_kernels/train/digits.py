"""A real image benchmark that needs no download: scikit-learn's bundled 8x8 handwritten digits
(1,797 images, 10 classes), read from the installed scikit-learn package without importing it.

Images are flattened to (n, 64) vectors in [-1, 1] (``pixel / 8 - 1``, row-major 8x8), so that
the training code written for points runs unchanged: the small DCGAN-style networks of
:func:`make_networks` take and give flat vectors.

Metrics (:func:`evaluate_digits`) use a small CNN (:func:`classifier`) trained once on all 1,797
images: classes covered with a confident prediction (the image analogue of mode count), the %
of confident samples, the JS divergence of the confident class histogram to uniform, and the
Fréchet distance to all real images in pixel space and in the classifier's 128-d feature space.
:func:`real_reference` gives the floor of each metric at a sample count.

The classifier trains deterministically (20 epochs, Adam, batch 64, one CPU thread) to 100%
accuracy on the data in about 5 s on a busy 2-core CPU, and is cached in
``<cache dir>/digits-classifier-v1.pt`` (``NATS_KERNELS_CACHE``, else
``$XDG_CACHE_HOME/nats_kernels``, else ``~/.cache/nats_kernels``), so later processes only load
it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gzip
import importlib.util
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .metrics import frechet_distance, js_to_uniform

#: latent size of the digits generator
DIGITS_Z_DIM: int = 32
#: a sample counts for a class when the classifier's softmax max is at least this
CONFIDENCE: float = 0.9

N_IMAGES, N_PIXELS, N_CLASSES = 1797, 64, 10
CACHE_FILE = "digits-classifier-v1.pt"
_FORMAT = "nats_kernels digits classifier v1"
_EPOCHS, _BATCH, _LR = 20, 64, 1e-3
_MIN_ACCURACY = 0.99


# ---------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class Digits:
    """The digits: ``images`` (1797, 64) float32 in [-1, 1], ``labels`` (1797,) int64."""

    name: str
    images: Tensor
    labels: Tensor
    # images copied to other devices, so that sample() copies them once per device
    _on_device: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def dim(self) -> int:
        return self.images.shape[1]

    @property
    def n_modes(self) -> int:
        return N_CLASSES

    @property
    def image_shape(self) -> tuple[int, int]:
        return (8, 8)

    def _images_on(self, device: torch.device) -> Tensor:
        if device == self.images.device:
            return self.images
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = self.images.to(device)
        return self._on_device[key]

    def sample(self, n: int, generator: torch.Generator, device=None) -> Tensor:
        """``n`` images (n, 64) drawn uniformly with replacement, on ``device`` (default: the
        generator's). The generator must live there; no host round trip, deterministic for a
        seeded generator."""
        device = torch.device(device) if device is not None else generator.device
        idx = torch.randint(0, self.images.shape[0], (n,), generator=generator, device=device)
        return self._images_on(device)[idx]


def _csv_path() -> Path:
    """scikit-learn's bundled digits.csv.gz, found without importing scikit-learn."""
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / "datasets" / "data" / "digits.csv.gz" if locations else None
    if path is None or not path.is_file():
        where = f" (no {path})" if path is not None else " (scikit-learn is not installed)"
        raise RuntimeError("the digits benchmark reads scikit-learn's bundled copy of the 8x8 "
                           f"digits{where}: pip install scikit-learn")
    return path


@functools.cache  # get_digits.cache_clear() resets it
def get_digits() -> Digits:
    """The 1,797 digits, loaded and checked once per process. RuntimeError when scikit-learn
    (whose copy is read) is missing, or its file is not the expected data."""
    path = _csv_path()
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",", ndmin=2)
    if data.shape != (N_IMAGES, N_PIXELS + 1):
        raise RuntimeError(f"digits: {path} holds a {data.shape} table; expected "
                           f"({N_IMAGES}, {N_PIXELS + 1}): 64 pixels and a label per row")
    if not np.array_equal(data, np.round(data)):
        raise RuntimeError(f"digits: {path} holds non-integer values")
    pixels, labels = data[:, :N_PIXELS], data[:, N_PIXELS]
    if pixels.min() < 0 or pixels.max() > 16:
        raise RuntimeError(f"digits: pixels of {path} outside 0..16")
    if labels.min() < 0 or labels.max() > N_CLASSES - 1:
        raise RuntimeError(f"digits: labels of {path} outside 0..9")
    images = torch.from_numpy(pixels).to(torch.float32) / 8 - 1  # exact: k / 8 in float32
    return Digits("digits", images.contiguous(), torch.from_numpy(labels).to(torch.int64))


# ---------------------------------------------------------------------------------------------
# GAN networks


class DigitsGenerator(nn.Module):
    """z (n, z_dim) -> images (n, 64) in [-1, 1]: Linear to 128x2x2, then two stride-2
    transposed convolutions (4x4, then 8x8), LeakyReLU(0.2) between, tanh at the end. No
    normalization layers (no running statistics), no in-place ops."""

    def __init__(self, z_dim: int = DIGITS_Z_DIM):
        super().__init__()
        self.z_dim = z_dim
        self.fc = nn.Linear(z_dim, 128 * 2 * 2)
        self.up1 = nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1)  # 2x2 -> 4x4
        self.up2 = nn.ConvTranspose2d(64, 1, 4, stride=2, padding=1)  # 4x4 -> 8x8

    def forward(self, z: Tensor) -> Tensor:
        h = F.leaky_relu(self.fc(z), 0.2).reshape(-1, 128, 2, 2)
        h = F.leaky_relu(self.up1(h), 0.2)
        return torch.tanh(self.up2(h)).reshape(-1, N_PIXELS)


class DigitsDiscriminator(nn.Module):
    """images (n, 64) -> logits (n, 1): two stride-2 convolutions (8x8 -> 4x4 -> 2x2, 64 then
    128 channels) with LeakyReLU(0.2), then Linear(512, 1). No normalization layers, no
    dropout, no in-place ops (double backward works, e.g. for gradient penalties)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 64, 4, stride=2, padding=1)  # 8x8 -> 4x4
        self.conv2 = nn.Conv2d(64, 128, 4, stride=2, padding=1)  # 4x4 -> 2x2
        self.fc = nn.Linear(128 * 2 * 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.conv1(x.reshape(-1, 1, 8, 8)), 0.2)
        h = F.leaky_relu(self.conv2(h), 0.2)
        return self.fc(h.flatten(1))


def make_networks(z_dim: int = DIGITS_Z_DIM) -> tuple[nn.Module, nn.Module]:
    """(G, D) for digits, initialized from the global RNG, both on flat (n, 64) images."""
    if isinstance(z_dim, bool) or not isinstance(z_dim, (int, np.integer)) or z_dim < 1:
        raise ValueError(f"z_dim: expected an integer >= 1, got {z_dim!r}")
    return DigitsGenerator(int(z_dim)), DigitsDiscriminator()


# ---------------------------------------------------------------------------------------------
# classifier


class DigitsClassifier(nn.Module):
    """The metrics' CNN on flat (n, 64) images in [-1, 1]: two 3x3 convolutions (16, 32
    channels) with ReLU, 2x2 max pooling, Linear(512, 128) + ReLU (the features), then
    Linear(128, 10) (the logits). (32 and 64 channels reach the same accuracy at twice the
    training time.)"""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 128)
        self.out = nn.Linear(128, N_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        """The (n, 128) penultimate activations."""
        h = F.relu(self.conv1(x.reshape(-1, 1, 8, 8)))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.features(x))


#: per process: the trained classifier per device (key: str of the device)
_CLASSIFIERS: dict[str, DigitsClassifier] = {}
#: per process: the real images' classifier features per device
_REAL_FEATURES: dict[str, Tensor] = {}


def cache_dir() -> Path:
    """``NATS_KERNELS_CACHE``, else ``$XDG_CACHE_HOME/nats_kernels``, else
    ``~/.cache/nats_kernels``."""
    if os.environ.get("NATS_KERNELS_CACHE"):
        return Path(os.environ["NATS_KERNELS_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "nats_kernels"
    return Path.home() / ".cache" / "nats_kernels"


def _accuracy(model: nn.Module, digits: Digits) -> float:
    with torch.no_grad():
        pred = model(digits.images).argmax(1)
    return float((pred == digits.labels).double().mean())


@contextlib.contextmanager
def _one_thread():
    """torch's intra-op pool at 1 thread for the block, then back to the caller's count. The
    classifier's training steps and the distances' eigh are tiny ops: on a busy 2-core machine
    a 2-thread pool ran them 10-100x slower (measured: training 5 s with 1 thread, 30-170 s
    with 2), and 1 thread makes the trained weights independent of the machine's core count."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _train_classifier(digits: Digits) -> DigitsClassifier:
    """Train the classifier on all images, deterministically, on the CPU in float32 with one
    thread, leaving the caller's RNG state (CPU; accelerators are not touched) and thread count
    as they were."""
    with (torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad(),
          torch.device("cpu"), _one_thread()):
        torch.default_generator.manual_seed(0)  # CPU only: the init of the layers
        model = DigitsClassifier().to(torch.float32)
        shuffle = torch.Generator().manual_seed(1)
        opt = torch.optim.Adam(model.parameters(), lr=_LR)
        x, y = digits.images, digits.labels
        for _ in range(_EPOCHS):
            perm = torch.randperm(x.shape[0], generator=shuffle)
            for i in range(0, x.shape[0], _BATCH):
                idx = perm[i:i + _BATCH]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return model


def _load_cached(path: Path) -> DigitsClassifier | None:
    """The classifier saved at ``path``, or None when there is none; a file that cannot be
    read, or does not hold the classifier, is reported by a warning and ignored."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or saved.get("format") != _FORMAT:
            raise ValueError("not a digits classifier file")
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):  # init: caller's RNG kept
            model = DigitsClassifier().to(torch.float32)
        state = saved["state_dict"]
        if any(not isinstance(v, Tensor) or v.dtype != torch.float32 for v in state.values()):
            raise ValueError("parameters are not float32 tensors")
        model.load_state_dict(state)  # strict: keys and shapes must match
        return model
    except Exception as e:  # noqa: BLE001 -- any unreadable file means: retrain
        warnings.warn(f"digits classifier: ignoring the cache file {path} ({type(e).__name__}: "
                      f"{e}); retraining it", RuntimeWarning, stacklevel=3)
        return None


def _save_cached(model: DigitsClassifier, path: Path) -> None:
    """Write atomically (temporary file, then os.replace); failing only warns."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": _FORMAT, "state_dict": model.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        warnings.warn(f"digits classifier: cannot cache it in {path.parent} ({e}); it will be "
                      f"retrained in the next process", RuntimeWarning, stacklevel=3)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _device_key(device) -> tuple[torch.device, str]:
    dev = torch.device(device)
    if dev.type != "cpu" and dev.index is None:
        backend = getattr(torch, dev.type, None)
        current = getattr(backend, "current_device", None)
        if callable(current):
            dev = torch.device(dev.type, current())
    return dev, str(dev)


def classifier(device="cpu") -> nn.Module:
    """The trained digits classifier on ``device`` (eval mode, no gradients), one instance per
    process and device: loaded from the cache file, or trained (and cached) when there is no
    valid one."""
    dev, key = _device_key(device)
    if key in _CLASSIFIERS:
        return _CLASSIFIERS[key]
    if "cpu" not in _CLASSIFIERS:
        digits = get_digits()
        path = cache_dir() / CACHE_FILE
        model = _load_cached(path)
        if model is not None and _accuracy(model, digits) < _MIN_ACCURACY:
            warnings.warn(f"digits classifier: the cache file {path} holds a classifier that "
                          f"does not recognize the digits; retraining it", RuntimeWarning,
                          stacklevel=2)
            model = None
        if model is None:
            model = _train_classifier(digits)
            _save_cached(model, path)
        _CLASSIFIERS["cpu"] = model.eval().requires_grad_(False)
    if key != "cpu":
        _CLASSIFIERS[key] = copy.deepcopy(_CLASSIFIERS["cpu"]).to(dev)
    return _CLASSIFIERS[key]


# ---------------------------------------------------------------------------------------------
# metrics


def _real_features(device: torch.device, key: str) -> Tensor:
    if key not in _REAL_FEATURES:
        with torch.no_grad():
            images = get_digits().images.to(device)
            _REAL_FEATURES[key] = classifier(device).features(images)
    return _REAL_FEATURES[key]


def evaluate_digits(samples: Tensor) -> dict:
    """Metrics of generated images ``samples`` (n >= 2, 64), any float dtype and device:

    - ``modes``: classes with at least one sample classified with confidence >= CONFIDENCE,
    - ``hq``: % of samples classified with confidence >= CONFIDENCE,
    - ``js``: JS divergence (natural log) of the confident samples' class histogram to uniform
      (ln 2 when none is confident),
    - ``fid``: Fréchet distance to all 1,797 real images in pixel space,
    - ``fid_features``: the same in the classifier's 128-d feature space.

    Classifier in float32 on the samples' device, distances in float64 on the CPU with one
    thread (the thread count is restored); no gradient. Samples with non-finite values are never
    confident, and give NaN distances.
    """
    if not isinstance(samples, Tensor) or not samples.is_floating_point():
        raise ValueError(f"samples: expected a floating-point tensor, got "
                         f"{getattr(samples, 'dtype', type(samples).__name__)}")
    if samples.dim() != 2 or samples.shape[1] != N_PIXELS or samples.shape[0] < 2:
        raise ValueError(f"samples: expected shape (n, {N_PIXELS}) with n >= 2, got "
                         f"{tuple(samples.shape)}")
    dev, key = _device_key(samples.device)
    with torch.no_grad():
        x = samples.detach().to(torch.float32)
        model = classifier(dev)
        feats = model.features(x)
        prob = model.out(feats).softmax(1)
        conf, pred = prob.max(1)
        confident = conf >= CONFIDENCE  # NaN: False
        counts = torch.bincount(pred[confident], minlength=N_CLASSES).cpu()
        hq = 100.0 * float(confident.double().mean())
        real_feats = _real_features(dev, key)
        finite = bool(torch.isfinite(x).all()) and bool(torch.isfinite(feats).all())
        if finite:
            with _one_thread():  # 64x64 and 128x128 eigh: 2 threads were 50-100x slower
                fid = frechet_distance(x.cpu().double(), get_digits().images.double())
                fid_features = frechet_distance(feats.cpu().double(), real_feats.cpu().double())
        else:
            fid = fid_features = math.nan
    return {
        "modes": int((counts > 0).sum()),
        "hq": hq,
        "js": js_to_uniform(counts),
        "fid": fid,
        "fid_features": fid_features,
    }


def real_reference(n: int, seed: int = 0) -> dict:
    """:func:`evaluate_digits` on ``n`` real images drawn with replacement (a CPU generator
    seeded ``seed``): the floor each metric reaches at that sample count."""
    gen = torch.Generator().manual_seed(seed)
    return evaluate_digits(get_digits().sample(n, gen))
