"""Data-parallel pieces: what the schemes and the median need under ``torch.distributed``.

- :func:`median_pairwise_distance`: the exact median over the union of every rank's shard.
- The schemes (``AWLoss``, ``BRC``, ``NestedTrainer``, ``AnnealedCFG``) take DDP-wrapped modules
  or ``process_group=`` directly; their collectives live in :mod:`nats_kernels.distributed._comm`.
"""

from .median import median_pairwise_distance

__all__ = ["median_pairwise_distance"]
