"""GAN losses for the synthetic benchmarks, split the way aw-loss and BRC need them.

Every loss gives the discriminator's real and fake terms separately (aw-loss weights them, design
§4) and the generator's loss on fake logits. The discriminator loss is always written as a
quantity to *minimize*; BRC's f is that loss on a non-detached fake batch (design §5: the sign
convention of f does not change the update).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class GANLoss:
    name: str
    real: Callable[[Tensor], Tensor]  # discriminator term on real logits
    fake: Callable[[Tensor], Tensor]  # discriminator term on fake logits
    gen: Callable[[Tensor], Tensor]  # generator loss on fake logits
    gp_weight: float = 0.0  # gradient penalty (WGAN-GP), added to the fake term

    def penalty(self, discriminator, real: Tensor, fake: Tensor, generator: torch.Generator):
        """WGAN-GP's (|grad_x D(x_hat)| - 1)^2 on random interpolates of real and fake."""
        t = torch.rand(real.shape[0], 1, generator=generator, device=real.device)
        x_hat = (t * real + (1 - t) * fake).requires_grad_(True)
        (grad,) = torch.autograd.grad(discriminator(x_hat).sum(), x_hat, create_graph=True)
        return self.gp_weight * (grad.norm(dim=1) - 1).square().mean()


LOSSES = {
    # the original GAN: D minimizes BCE, G the non-saturating -log D(G(z))
    "vanilla": GANLoss("vanilla", lambda r: F.softplus(-r).mean(), lambda f: F.softplus(f).mean(),
                       lambda f: F.softplus(-f).mean()),
    "lsgan": GANLoss("lsgan", lambda r: 0.5 * (r - 1).square().mean(),
                     lambda f: 0.5 * f.square().mean(), lambda f: 0.5 * (f - 1).square().mean()),
    "hinge": GANLoss("hinge", lambda r: F.relu(1 - r).mean(), lambda f: F.relu(1 + f).mean(),
                     lambda f: -f.mean()),
    "wgan-gp": GANLoss("wgan-gp", lambda r: -r.mean(), lambda f: f.mean(), lambda f: -f.mean(),
                       gp_weight=10.0),
}


def get_loss(name: str) -> GANLoss:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"loss: unknown {name!r}; expected one of {sorted(LOSSES)}") from None
