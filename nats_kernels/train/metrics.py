"""Metrics of design §6 for generated points of a Gaussian mixture (PacGAN's MetricLogger rules)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .data import Mixture


def mode_counts(samples: Tensor, mixture: Mixture) -> tuple[Tensor, Tensor]:
    """(counts per mode, assigned mask): a point belongs to its nearest mode when it lies within
    3 std of it."""
    centres = mixture.centres.to(samples.device, torch.float64)
    dist = torch.cdist(samples.double(), centres)
    dmin, nearest = dist.min(1)
    assigned = dmin < 3 * mixture.std
    counts = torch.bincount(nearest[assigned], minlength=mixture.n_modes)
    return counts, assigned


def js_to_uniform(counts: Tensor) -> float:
    """Jensen-Shannon divergence (natural log, so at most ln 2) between the normalized histogram
    ``counts`` and the uniform distribution over its bins. No assigned point at all: ln 2."""
    counts = counts.double()
    total = counts.sum()
    if total <= 0:
        return math.log(2.0)
    p = counts / total
    u = torch.full_like(p, 1.0 / p.numel())
    m = 0.5 * (p + u)

    def kl(a, b):
        nz = a > 0
        return float((a[nz] * (a[nz] / b[nz]).log()).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(u, m)


def _sqrtm_psd(a: Tensor) -> Tensor:
    vals, vecs = torch.linalg.eigh(a)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(x: Tensor, y: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to the raw coordinates of ``x`` and ``y``
    (the synthetic-data FID of the BRC paper): |mu_x - mu_y|^2 + Tr(Sx + Sy - 2 (Sx Sy)^1/2)."""
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    sx, sy = torch.cov(x.T).reshape(x.shape[1], x.shape[1]), torch.cov(y.T).reshape(
        y.shape[1], y.shape[1])
    root = _sqrtm_psd(sx)
    cross = torch.linalg.eigvalsh(root @ sy @ root).clamp_min(0).sqrt().sum()
    return float((mx - my).square().sum() + sx.trace() + sy.trace() - 2 * cross)


def evaluate(samples: Tensor, mixture: Mixture, real: Tensor) -> dict:
    """modes, hq (% of points assigned to a mode), js (assigned histogram vs uniform) and fid
    (against ``real``, drawn with as many points as ``samples``)."""
    if samples.shape != real.shape:
        raise ValueError(f"evaluate: samples {tuple(samples.shape)} and real "
                         f"{tuple(real.shape)} must have equal counts and dims")
    counts, assigned = mode_counts(samples, mixture)
    return {
        "modes": int((counts > 0).sum()),
        "hq": 100.0 * float(assigned.double().mean()),
        "js": js_to_uniform(counts),
        "fid": frechet_distance(samples, real),
    }
