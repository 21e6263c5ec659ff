"""Embedded benchmarks (design §6): mixtures of Gaussians, generated, never downloaded; the
image benchmark ``digits`` lives in ``digits.py``."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Mixture:
    """A uniform mixture of isotropic Gaussians: ``centres`` (K, dim), one ``std`` for all."""

    name: str
    centres: Tensor
    std: float

    @property
    def dim(self) -> int:
        return self.centres.shape[1]

    @property
    def n_modes(self) -> int:
        return self.centres.shape[0]

    def sample(self, n: int, generator: torch.Generator, device=None) -> Tensor:
        """``n`` points on ``device`` (mode drawn uniformly, then centre + std * N(0, I)). The
        generator must live on ``device``; everything stays there (no host round trip)."""
        device = torch.device(device) if device is not None else generator.device
        centres = self.centres.to(device)
        k = torch.randint(0, self.n_modes, (n,), generator=generator, device=device)
        noise = torch.randn(n, self.dim, generator=generator, device=device)
        return centres[k] + self.std * noise


def _ring(k: int, std: float, name: str) -> Mixture:
    angle = 2 * math.pi * torch.arange(k, dtype=torch.float64) / k  # no duplicated endpoint
    return Mixture(name, torch.stack((angle.cos(), angle.sin()), 1).float(), std)


def _grid(values, dim: int, std: float, name: str) -> Mixture:
    pts = torch.tensor(list(itertools.product(values, repeat=dim)), dtype=torch.float32)
    return Mixture(name, pts, std)


#: std of the BRC paper's synthetic sets: its "variance 0.02" (design §6.1).
BRC_STD = math.sqrt(0.02)

#: The benchmarks of design §6. ring8 / ring5 / cube27 use std 0.02 (stricter than the BRC
#: paper's "variance 0.02"); ring8-brc / cube27-brc are the same centres at the paper's variance
#: (std ~0.141, ring8-brc's 3-std discs overlap: a point counts for its nearest centre);
#: grid25 the usual 0.05.
DATASETS = {
    "ring8": _ring(8, 0.02, "ring8"),
    "ring5": _ring(5, 0.02, "ring5"),
    "grid25": _grid((-4.0, -2.0, 0.0, 2.0, 4.0), 2, 0.05, "grid25"),
    "cube27": _grid((-1.0, 0.0, 1.0), 3, 0.02, "cube27"),
    "ring8-brc": _ring(8, BRC_STD, "ring8-brc"),
    "cube27-brc": _grid((-1.0, 0.0, 1.0), 3, BRC_STD, "cube27-brc"),
}


#: Every benchmark ``--dataset`` accepts: the mixtures above and ``digits``, scikit-learn's
#: bundled 8x8 handwritten digits (``train/digits.py``, design §6.4).
BENCHMARKS = (*DATASETS, "digits")


def get_dataset(name: str):
    """The benchmark called ``name``: a :class:`Mixture`, or for ``"digits"`` the
    ``train.digits.Digits`` images (loaded on first use). A ``ValueError`` for an unknown name."""
    if name == "digits":
        from .digits import get_digits

        return get_digits()
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"dataset: unknown {name!r}; expected one of {sorted(BENCHMARKS)}") \
            from None
