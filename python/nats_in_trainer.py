"""NATS (nested annealed training scheme) dropped into a plain alternating GAN loop.

Run: python python/nats_in_trainer.py [--steps N] [--n-d 5] [--mode loss|lr|accumulate]
                                      [--weight-on output|loss]

A small non-saturating GAN on the 8-mode ring (design §6). The usual loop alternates one D step
and one G step (CTS). NATS (design §2) nests them: for j = 1..n_d, one D step then j G steps
weighted w[1..j], w the annealed geometric progression. Lines marked `# nats_kernels` are the
ones a user changes in an existing loop:

* `nk.annealed_weights(*preset_weights(...), n_d)` builds the weights once (the paper's preset
  below 128x128 is [1, 0.01]; Technique 1's distances are printed for reference);
* the alternating `for step` loop becomes `for kind, w in nested_schedule(n_d, weights)`;
* the generator step takes `w`: the NATS paper puts it on the discriminator's output inside
  the generator loss, `softplus(-w * D(G(z)))` (its Algorithm 3, line 10; the default here),
  `--weight-on loss` multiplies the loss instead, `w * softplus(-D(G(z)))`: two different
  methods for this loss (docs/design.md §2.1).

`--mode lr` / `--mode accumulate` run the same scheme through `NestedTrainer`, where `w`
scales the learning rate, or weights the block's generator gradients into one optimizer step
(`nk.cfg_accumulate` over the gradient buffers). `--steps` counts outer iterations (each n_d D
steps and n_d(n_d+1)/2 G steps); the default 1000 takes about a minute on one CPU core. A
vanilla GAN on this ring covers few modes at first (the BRC paper reports 3.5 of 8 for VGAN):
this is a demonstration of the API, not a benchmark.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import nats_kernels as nk
from nats_kernels.schemes import (  # nats_kernels
    NestedTrainer,
    initial_weight_distances,
    nested_schedule,
    preset_weights,
)
from nats_kernels.train import get_dataset, mode_counts

# The embedded 8-mode ring of design §6 (generated, std 0.02).
RING = get_dataset("ring8")


def ring(n: int, gen: torch.Generator) -> torch.Tensor:
    return RING.sample(n, gen)


def mlp(i: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Linear(i, 128), nn.LeakyReLU(0.2), nn.Linear(128, 128),
                         nn.LeakyReLU(0.2), nn.Linear(128, o))


def ring_metrics(x: torch.Tensor) -> tuple[int, float]:
    """Modes hit and % of points within 3 std of their nearest mode (design §6)."""
    counts, assigned = mode_counts(x, RING)
    return int((counts > 0).sum()), 100.0 * float(assigned.double().mean())


def main(steps: int = 1000, n_d: int = 5, mode: str = "loss", seed: int = 0,
         weight_on: str = "output") -> tuple[int, float]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    G, D = mlp(2, 2), mlp(2, 1)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    softplus = nn.functional.softplus

    with torch.no_grad():  # NATS Technique 1: how far the initial G is from the data
        d1, d2 = initial_weight_distances(ring(512, gen), G(torch.randn(512, 2, generator=gen)))
    print(f"Technique 1: D1 = {float(d1):.3f}, D2 = {float(d2):.3f}")
    weights = nk.annealed_weights(*preset_weights(32), n_d)  # nats_kernels: [1, 0.01]

    def d_step():
        real = ring(256, gen)
        fake = G(torch.randn(256, 2, generator=gen)).detach()
        opt_d.zero_grad()
        (softplus(-D(real)).mean() + softplus(D(fake)).mean()).backward()
        opt_d.step()

    def g_loss():
        return softplus(-D(G(torch.randn(256, 2, generator=gen)))).mean()

    def g_step(w=1.0):
        opt_g.zero_grad()
        if weight_on == "output":  # nats_kernels: the paper's form, w on D's output
            loss = softplus(-w * D(G(torch.randn(256, 2, generator=gen)))).mean()
        else:  # nats_kernels: the other form, the loss times w
            loss = w * g_loss()
        loss.backward()
        opt_g.step()

    if mode == "loss":
        for _ in range(steps):
            # was: d_step(); g_step()
            for kind, w in nested_schedule(n_d, weights):  # nats_kernels
                if kind == "D":
                    d_step()
                else:
                    g_step(w)  # nats_kernels
    else:
        trainer = NestedTrainer(d_step, g_step if mode == "lr" else g_loss,  # nats_kernels
                                n_d=n_d, weights=weights, mode=mode, g_optimizer=opt_g)
        trainer.run(steps)  # nats_kernels

    with torch.no_grad():
        sample = G(torch.randn(2000, 2, generator=gen))
    modes, hq = ring_metrics(sample)
    print(f"{steps} outer iterations (n_d = {n_d}, mode = {mode}): {modes}/8 modes, "
          f"{hq:.1f}% high-quality points")
    return modes, hq


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="outer iterations")
    parser.add_argument("--n-d", type=int, default=5)
    parser.add_argument("--mode", choices=["loss", "lr", "accumulate"], default="loss")
    parser.add_argument("--weight-on", choices=["output", "loss"], default="output",
                        help="mode loss: where w acts in the generator step (default: output)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # models this small only wait on a thread pool
    main(args.steps, args.n_d, args.mode, weight_on=args.weight_on)
