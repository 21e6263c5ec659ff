"""Public ops: validation, docstring and the custom-op registration of each hot path."""

from .aw import aw_combine_, aw_weights, multi_dot
from .cfg import annealed_weights, cfg_accumulate, cfg_step_
from .iga import iga_correction_, iga_ratio
from .median import DEFAULT_MEMORY_BUDGET, median_pairwise_distance

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "annealed_weights",
    "aw_combine_",
    "aw_weights",
    "cfg_accumulate",
    "cfg_step_",
    "iga_correction_",
    "iga_ratio",
    "median_pairwise_distance",
    "multi_dot",
]
