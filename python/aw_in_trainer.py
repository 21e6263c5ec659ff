"""nats_kernels' aw-loss dropped into a plain hinge-GAN discriminator step.

Run: python python/aw_in_trainer.py [--steps N] [--alg2]

A small GAN on the 8-mode ring (design §6, std 0.02). The loop is the usual alternating one; the
discriminator's `d_loss.backward()` becomes `aw.backward(...)`, which weights the real and fake
gradients adaptively (design §4). Lines marked `# nats_kernels` are the ones a user changes:

* `AWLoss(D)` is built once;
* the discriminator loss is kept as its two terms, L_r and L_f, instead of their sum;
* `aw.backward(loss_real, loss_fake, real_logits, fake_logits)` replaces `d_loss.backward()`
  (it overwrites D's `.grad`, never reads a value on the host, and returns the weighted loss);
  `aw.last_case` / `aw.last_weights` are there for logging.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from nats_kernels.schemes import AWLoss  # nats_kernels
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


def main(steps: int = 2000, batch: int = 256, normalized: bool = True, seed: int = 0) -> dict:
    torch.set_num_threads(1)  # tiny networks: one thread is fastest (no OpenMP wake-ups)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    G, D = mlp(2, 2), mlp(2, 1)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999))
    aw = AWLoss(D, normalized=normalized)  # nats_kernels
    cases = torch.zeros(6, dtype=torch.int64)  # how often each case of the rule was taken
    for _ in range(steps):
        real = ring(batch, gen)
        fake = G(torch.randn(batch, 2, generator=gen))

        # discriminator step (hinge loss)
        real_logits, fake_logits = D(real), D(fake.detach())
        loss_real = torch.relu(1 - real_logits).mean()  # nats_kernels: keep the two terms
        loss_fake = torch.relu(1 + fake_logits).mean()  # nats_kernels
        opt_d.zero_grad()
        d_loss = aw.backward(loss_real, loss_fake, real_logits, fake_logits)  # nats_kernels
        opt_d.step()
        cases += torch.arange(6) == aw.last_case  # count on device: no host sync

        # generator step (unchanged)
        g_loss = -D(fake).mean()
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()

    with torch.no_grad():
        samples = G(torch.randn(2000, 2, generator=gen))
    n_modes, hq = modes(samples)
    w_r, w_f = (w.item() for w in aw.last_weights)
    print(f"{steps} steps done (aw-loss, {'normalized' if normalized else 'non-normalized'})")
    print(f"  last d_loss {d_loss.item():.4f}, weights w_r {w_r:.4f} w_f {w_f:.4f}")
    print("  cases taken: " + ", ".join(f"{c}: {int(cases[c])}" for c in range(1, 6)))
    print(f"  modes covered: {n_modes}/8, high-quality samples: {100 * hq:.1f}%")
    return {"modes": n_modes, "high_quality": hq, "cases": cases[1:].tolist()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--alg2", action="store_true", help="non-normalized rule (Algorithm 2)")
    args = parser.parse_args()
    main(args.steps, normalized=not args.alg2)
