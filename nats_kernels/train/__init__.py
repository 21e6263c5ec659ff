"""The main job: train GANs on embedded synthetic benchmarks with the library's schemes and
compare them with design §6's metrics (``nats-kernels train``)."""

from .data import DATASETS, Mixture, get_dataset
from .losses import LOSSES, GANLoss, get_loss
from .metrics import evaluate, frechet_distance, js_to_uniform, mode_counts
from .runner import RunConfig, parse_scheme, run

__all__ = ["DATASETS", "LOSSES", "GANLoss", "Mixture", "RunConfig", "evaluate",
           "frechet_distance", "get_dataset", "get_loss", "js_to_uniform", "mode_counts",
           "parse_scheme", "run"]
