"""nats_kernels dropped into a plain CFG-style generator update.

Run: python python/cfg_in_trainer.py [--steps N]

A small GAN on the 8-mode ring. The discriminator trains as usual; the generated batch is moved
by M functional-gradient steps of grad_x D (design §1) with the annealed weights of NATS. Lines
marked `# nats_kernels` are the ones a user changes in an existing loop:

* `nk.annealed_weights` builds the decreasing weight vector once;
* `nk.cfg_step_` replaces `x.data += eta * x.grad.data` for each step (in place, on device);
* `nk.cfg_accumulate` rebuilds the moved batch from x0 and the stored per-step gradients in one
  pass (e.g. the regression targets of CFG's generator approximator).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import nats_kernels as nk
from nats_kernels.train import get_dataset

# The embedded 8-mode ring of design §6 (generated, std 0.02).
RING = get_dataset("ring8")


def ring(n: int, gen: torch.Generator) -> torch.Tensor:
    return RING.sample(n, gen)


def mlp(i: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Linear(i, 64), nn.LeakyReLU(0.2), nn.Linear(64, 64),
                         nn.LeakyReLU(0.2), nn.Linear(64, o))


def main(steps: int = 200, M: int = 5, eta: float = 0.2, seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    G, D = mlp(2, 2), mlp(2, 1)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3)
    weights = nk.annealed_weights(1.0, 0.01, M)  # nats_kernels
    bce = nn.functional.binary_cross_entropy_with_logits
    for _ in range(steps):
        real = ring(128, gen)
        z = torch.randn(128, 2, generator=gen)
        x0 = G(z).detach()

        opt_d.zero_grad()
        d_loss = bce(D(real), torch.ones(128, 1)) + bce(D(x0), torch.zeros(128, 1))
        d_loss.backward()
        opt_d.step()

        # Move the fake batch up D's gradient, M annealed steps (CFG with NATS weights).
        x, grads = x0.clone(), []
        for m in range(M):
            xm = x.detach().requires_grad_()
            (g,) = torch.autograd.grad(D(xm).sum(), xm)
            grads.append(g)
            nk.cfg_step_(x, g, weights[m], eta=eta)  # nats_kernels
        target = nk.cfg_accumulate(x0, grads, weights, eta=eta)  # nats_kernels
        assert torch.allclose(target, x, atol=1e-5)

        # The generator regresses onto the moved samples (CFG's approximator step).
        opt_g.zero_grad()
        ((G(z) - target) ** 2).sum(1).mean().backward()
        opt_g.step()
    sample = G(torch.randn(1000, 2, generator=gen)).detach()
    radius = sample.norm(dim=1).mean().item()
    print(f"{steps} steps done; mean radius of generated points: {radius:.3f}")
    return radius


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    main(args.steps)
