"""NATS Technique 1 (design §3): the two median distances behind the initial annealed weight, and
the paper's weight presets by resolution."""

from __future__ import annotations

import math

from torch import Tensor

from .. import _validate as v
from ..ops import median_pairwise_distance

#: The paper's annealed-weight presets (first, last): below 128x128 and at 256x256 (NATS paper,
#: Section IV-A "Implementation Details" and Tables IV/V).
LOW_RESOLUTION_PRESET = (1.0, 0.01)
HIGH_RESOLUTION_PRESET = (20.0, 1.0)


def initial_weight_distances(
    real: Tensor, fake: Tensor, *, memory_budget: int | None = None, group=None
) -> tuple[Tensor, Tensor]:
    """NATS Technique 1's two medians: ``D1`` among training samples, ``D2`` between training
    samples and the *initial* (untrained) generator's samples.

    Technique 1 picks the initial annealed weight ``w_1`` larger when these distances are larger
    (paper Table I lists them per dataset); the paper gives no formula from ``(D1, D2)`` to
    ``w_1``, so this function only measures. Compare your data's values with a dataset whose
    preset you trust (:func:`preset_weights`).

    Both are exact lower medians of Euclidean distances (``nk.median_pairwise_distance``,
    without the N x N matrix): ``D1`` over the ``N(N-1)/2`` pairs of ``real``, ``D2`` over all
    ``N*M`` pairs (row of ``real``, row of ``fake``). Feature dims are flattened, so images
    ``(N, C, H, W)`` work as they are.

    Args:
        real: ``(N, *feat)`` training samples, N >= 2, floating dtype.
        fake: ``(M, *feat)`` samples of the initial generator, M >= 1; same feature shape,
            dtype and device as ``real`` (detach them, e.g. generate under ``torch.no_grad()``).
        memory_budget: passed to ``median_pairwise_distance`` (bytes of workspace).
        group: a ``torch.distributed`` process group (e.g. ``torch.distributed.group.WORLD``):
            ``real`` and ``fake`` are then this rank's shards (of any size, possibly empty), and
            every rank of the group gets the medians over the union of the shards, from
            :func:`nats_kernels.distributed.median_pairwise_distance` (which checks the inputs
            on every rank alike). Default: this process's samples only.

    Returns:
        ``(D1, D2)``: two 0-d tensors in ``real``'s dtype on its device (never read back to the
        host here; call ``float()`` yourself to print them).

    Raises:
        TypeError / ValueError: as ``median_pairwise_distance`` (non-floating input, dtype or
            feature-shape mismatch, different devices, N < 2 or M < 1).
    """
    if group is not None:
        from ..distributed import median_pairwise_distance as distributed_median

        if isinstance(real, Tensor):
            real = real.detach()
        if isinstance(fake, Tensor):
            fake = fake.detach()
        d1 = distributed_median(real, group=group, memory_budget=memory_budget)
        d2 = distributed_median(real, fake, group=group, memory_budget=memory_budget)
        return d1, d2
    v.tensor("real", real)
    v.tensor("fake", fake)
    if real.dim() < 1 or fake.dim() < 1:
        raise ValueError(
            f"real and fake must have shape (N, *feat), got {tuple(real.shape)} and "
            f"{tuple(fake.shape)}"
        )
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(
            f"fake must have the feature shape of real {tuple(real.shape[1:])}, "
            f"got {tuple(fake.shape[1:])}"
        )
    v.same_device(real.device, fake=fake)
    v.same_dtype("fake", fake, real.dtype, "real")
    real, fake = real.detach(), fake.detach()
    d1 = median_pairwise_distance(real, memory_budget=memory_budget)
    d2 = median_pairwise_distance(real, fake, memory_budget=memory_budget)
    return d1, d2


def preset_weights(resolution, *, nearest: bool = False) -> tuple[float, float]:
    """The paper's annealed-weight presets ``(first, last)``, e.g. for
    ``nk.annealed_weights(*preset_weights(64), M)``.

    The paper (NATS, Section IV-A and Tables IV/V) states two settings only:

    - resolution **below 128x128** (CIFAR10 32, LSUN/CelebA 64, ImageNet 64): ``(1.0, 0.01)``;
    - **256x256** (LSUN Church/Tower, CelebA 256): ``(20.0, 1.0)``.

    Everything else -- 128x128 itself, 129..255, above 256 -- is not covered by the paper and
    raises ``ValueError`` unless ``nearest=True``, which takes the preset of the nearer covered
    resolution on a log2 scale, with the low range ending at 128: ``128 <= r < 128*sqrt(2)``
    (about 181) gives the low preset, ``r >= 181`` (including everything above 256) the high
    one. That is an extrapolation of ours, not the paper's; prefer measuring with
    :func:`initial_weight_distances` and choosing ``w_1`` by Technique 1.

    Args:
        resolution: a Python int (side of a square image) or a pair ``(H, W)``; a non-square
            image counts as the square of equal pixel count, ``sqrt(H * W)``. Positive.
        nearest: map uncovered resolutions to the nearer preset instead of raising.

    Returns:
        ``(first, last)`` as Python floats.

    Raises:
        TypeError: resolution not an int or a pair of ints, a non-bool ``nearest``.
        ValueError: a non-positive size; an uncovered resolution with ``nearest=False``.
    """
    nearest = v.flag("nearest", nearest)
    if isinstance(resolution, (tuple, list)):
        if len(resolution) != 2:
            raise ValueError(f"resolution must be an int or a pair (H, W), got {resolution!r}")
        sizes = resolution
    else:
        sizes = (resolution,)
    for s in sizes:
        if not v.is_int(s):
            raise TypeError(
                f"resolution must be an int or a pair of ints, got {type(s).__name__} in "
                f"{resolution!r}"
            )
        if s < 1:
            raise ValueError(f"resolution must be positive, got {resolution!r}")
    side = math.sqrt(sizes[0] * sizes[1]) if len(sizes) == 2 else float(sizes[0])
    if side < 128:
        return LOW_RESOLUTION_PRESET
    if side == 256:
        return HIGH_RESOLUTION_PRESET
    if not nearest:
        raise ValueError(
            f"the NATS paper gives annealed-weight presets for resolutions below 128x128 "
            f"{LOW_RESOLUTION_PRESET} and at 256x256 {HIGH_RESOLUTION_PRESET} only, not for "
            f"{resolution!r}; pass nearest=True to take the nearer one (log2 scale), or choose "
            f"the weights from initial_weight_distances (Technique 1)"
        )
    return LOW_RESOLUTION_PRESET if side < 128 * math.sqrt(2) else HIGH_RESOLUTION_PRESET
