"""Pure-PyTorch references: the oracle every backend is tested against, and the fallback that
runs on any device. Each ``<op>_ref`` takes the arguments its custom op receives (validated)."""

from .._dispatch import register
from .aw import aw_combine_ref, aw_weights_ref, multi_dot_ref
from .cfg import annealed_weights_ref, cfg_accumulate_ref, cfg_step_ref
from .iga import iga_correction_ref, iga_ratio_ref
from .median import median_pairwise_distance_ref

__all__ = [
    "annealed_weights_ref",
    "aw_combine_ref",
    "aw_weights_ref",
    "cfg_accumulate_ref",
    "cfg_step_ref",
    "iga_correction_ref",
    "iga_ratio_ref",
    "median_pairwise_distance_ref",
    "multi_dot_ref",
]

for _op, _fn in {
    "annealed_weights": annealed_weights_ref,
    "cfg_accumulate": cfg_accumulate_ref,
    "cfg_accumulate_list": cfg_accumulate_ref,
    "cfg_step_": cfg_step_ref,
    "median_pairwise_distance": median_pairwise_distance_ref,
    "multi_dot": multi_dot_ref,
    "aw_weights": aw_weights_ref,
    "aw_combine_": aw_combine_ref,
    "iga_ratio": iga_ratio_ref,
    "iga_correction_": iga_correction_ref,
}.items():
    register("reference", _op)(_fn)
