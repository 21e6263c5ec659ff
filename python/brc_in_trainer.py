"""nats_kernels' best-response constraint (BRC / IGA) dropped into a plain GAN generator step.

Run: python python/brc_in_trainer.py [--steps N] [--no-brc]

A vanilla (non-saturating) GAN on the 8-mode ring (design §6, std 0.02, stricter than the BRC
paper's variance 0.02; smaller networks). The generator's `g_loss.backward()` becomes
`brc.backward(F, f)`, which adds the implicit-gradient correction -r * df/dG of design §5.
Lines marked `# nats_kernels` are the ones a user changes:

* `BRC(G, D)` is built once;
* the generator step also computes f, the discriminator's loss on the same fake batch, which
  must not be detached;
* `brc.backward(F, f)` replaces `F.backward()`; it leaves D's `.grad` alone, never reads a value
  on the host, and returns r (a device tensor) for logging.

`--no-brc` runs the same loop with plain `F.backward()` for comparison.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits as bce

from nats_kernels.schemes import BRC  # nats_kernels
from nats_kernels.train import get_dataset, mode_counts

# The embedded 8-mode ring of design §6 (generated, std 0.02).
RING = get_dataset("ring8")


def ring(n: int, gen: torch.Generator) -> torch.Tensor:
    return RING.sample(n, gen)


def mlp(i: int, o: int, width: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(i, width), nn.LeakyReLU(0.2), nn.Linear(width, width),
                         nn.LeakyReLU(0.2), nn.Linear(width, o))


def modes(samples: torch.Tensor) -> tuple[int, float]:
    """Modes hit and high-quality fraction: a point counts for its nearest centre when it lies
    within 3 std of it (design §6)."""
    counts, assigned = mode_counts(samples, RING)
    return int((counts > 0).sum()), float(assigned.double().mean())


def main(steps: int = 2000, batch: int = 256, use_brc: bool = True, seed: int = 0) -> dict:
    torch.set_num_threads(1)  # tiny networks: one thread is fastest (no OpenMP wake-ups)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    G, D = mlp(2, 2), mlp(2, 1)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999))
    brc = BRC(G, D)  # nats_kernels
    ones, zeros = torch.ones(batch, 1), torch.zeros(batch, 1)
    r_sum = torch.zeros(())
    for _ in range(steps):
        # discriminator step (unchanged)
        real = ring(batch, gen)
        fake = G(torch.randn(batch, 2, generator=gen))
        d_loss = bce(D(real), ones) + bce(D(fake.detach()), zeros)
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()

        # generator step
        fake_logits = D(fake)
        F = bce(fake_logits, ones)
        opt_g.zero_grad()
        if use_brc:
            f = bce(D(real), ones) + bce(fake_logits, zeros)  # nats_kernels: same fake, no detach
            r_sum += brc.backward(F, f)  # nats_kernels: instead of F.backward()
        else:
            F.backward()
        opt_g.step()

    with torch.no_grad():
        samples = G(torch.randn(2000, 2, generator=gen))
    n_modes, hq = modes(samples)
    print(f"{steps} steps done ({'BRC' if use_brc else 'plain'} generator step)")
    if use_brc:
        print(f"  last r {brc.last_ratio.item():+.4f}, mean r {r_sum.item() / steps:+.4f}")
    print(f"  modes covered: {n_modes}/8, high-quality samples: {100 * hq:.1f}%")
    return {"modes": n_modes, "high_quality": hq}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--no-brc", action="store_true", help="plain F.backward() for comparison")
    args = parser.parse_args()
    main(args.steps, use_brc=not args.no_brc)
