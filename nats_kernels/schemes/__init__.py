"""Drop-in training schemes for existing GAN trainers (design §7).

Each wrapper leaves the optimizer step to the caller, so it replaces one ``loss.backward()``
line of a trainer that already has ``loss.backward(); opt.step()``:

- :class:`AWLoss` -- adaptive weighted discriminator loss (aw-loss, design §4);
- :class:`BRC` -- best-response constraint with the implicit gradient approximation (design §5);
- :func:`nested_schedule` / :class:`NestedTrainer` -- NTS / NATS / CTS (design §2);
- :class:`AnnealedCFG` -- composite functional gradient GAN with annealed weights (design §1);
- :func:`initial_weight_distances` / :func:`preset_weights` -- NATS Technique 1 (design §3).
"""

from ..ops import annealed_weights
from .aw import AWLoss
from .brc import BRC
from .cfg import AnnealedCFG, DiffMaxExceeded
from .distances import initial_weight_distances, preset_weights
from .nested import NestedTrainer, nested_schedule

__all__ = [
    "AWLoss",
    "AnnealedCFG",
    "BRC",
    "DiffMaxExceeded",
    "NestedTrainer",
    "annealed_weights",
    "initial_weight_distances",
    "nested_schedule",
    "preset_weights",
]
