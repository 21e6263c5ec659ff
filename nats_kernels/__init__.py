"""nats_kernels: fused kernels and drop-in training schemes for GAN research.

Hot paths of annealed CFG / NATS, the adaptive weighted discriminator loss (aw-loss) and the
best-response constraint (BRC / IGA). See README.md and docs/design.md for the math of each op.
"""

from . import reference  # noqa: F401  (registers the reference kernels)
from ._dispatch import backends  # noqa: F401  (public, in __all__ below)
from ._load import load_all as _load_all
from .ops import *  # noqa: F403  (the public ops; ops.__all__ is the one list of them)
from .ops import __all__ as _ops_all

_load_all()

__version__ = "0.1.0"
__all__ = sorted([*_ops_all, "backends"])
