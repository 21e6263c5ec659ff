"""Annealed CFG (composite functional gradient GAN with NATS weights) on the 8-mode ring.

Run: python python/annealed_cfg_in_trainer.py [--steps N] [--M 10] [--eta 0.1]

`AnnealedCFG` (design §1) runs the official CFG algorithm with the annealed weight vector: per
stage, M discriminator snapshots are trained (each sample is moved up grad_x D_m with weight
w_m, by the fused in-place `nk.cfg_step_`), then the generator is fitted to the moved samples.
Lines marked `# nats_kernels` are what a training script needs; `--steps` counts stages.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch
from torch import nn

import nats_kernels as nk
from nats_kernels.schemes import AnnealedCFG, preset_weights  # nats_kernels
from nats_kernels.train import get_dataset, mode_counts

# The embedded 8-mode ring of design §6 (generated, std 0.02).
RING = get_dataset("ring8")


def ring_batches(batch: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """An endless stream of real batches, as a data loader would give them."""
    while True:
        yield RING.sample(batch, gen)


def mlp(i: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Linear(i, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, o))


def ring_metrics(x: torch.Tensor) -> tuple[int, float]:
    """Modes hit and % of points within 3 std of their nearest mode (design §6)."""
    counts, assigned = mode_counts(x, RING)
    return int((counts > 0).sum()), 100.0 * float(assigned.double().mean())


def main(steps: int = 30, M: int = 10, eta: float = 0.1, seed: int = 0) -> tuple[int, float]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    G, D = mlp(2, 2), mlp(2, 1)
    cfg = AnnealedCFG(  # nats_kernels
        G, D, M=M, eta=eta, z_dim=2, batch_size=64, N=640, x_epochs=10, lr=1e-3,
        weights=nk.annealed_weights(*preset_weights(32), M),  # nats_kernels: [1, 0.01]
    )
    real = ring_batches(64, gen)
    for stage in range(steps):
        cfg.train_stage(real)  # nats_kernels: M*U D steps + snapshots, then G's fit
        if (stage + 1) % 10 == 0 or stage + 1 == steps:
            modes, hq = ring_metrics(cfg.generate(2000))  # nats_kernels: G(z) + M steps
            print(f"stage {stage + 1}: D loss {float(cfg.last_d_loss):.3f}, "
                  f"fit loss {float(cfg.last_approx_loss):.4f}, {modes}/8 modes, "
                  f"{hq:.1f}% high-quality points")
    checkpoint = cfg.state_dict()  # nats_kernels: G, D, snapshots, optimizer, stage
    cfg.load_state_dict(checkpoint)
    return ring_metrics(cfg.generate(2000))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="stages")
    parser.add_argument("--M", type=int, default=10)
    parser.add_argument("--eta", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(1)  # models this small only wait on a thread pool
    main(args.steps, args.M, args.eta)
