"""nats_kernels: fused kernels and drop-in training schemes for GAN research.

Hot paths of annealed CFG / NATS, the adaptive weighted discriminator loss (aw-loss) and the
best-response constraint (BRC / IGA). See README.md and docs/design.md for the math of each op.
"""

from . import reference  # noqa: F401  (registers the reference kernels)
from ._dispatch import backends
from ._load import load_all as _load_all
from .ops import (
    DEFAULT_MEMORY_BUDGET,
    annealed_weights,
    aw_combine_,
    aw_weights,
    cfg_accumulate,
    cfg_step_,
    iga_correction_,
    iga_ratio,
    median_pairwise_distance,
    multi_dot,
)

_load_all()

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "annealed_weights",
    "aw_combine_",
    "aw_weights",
    "backends",
    "cfg_accumulate",
    "cfg_step_",
    "iga_correction_",
    "iga_ratio",
    "median_pairwise_distance",
    "multi_dot",
]
