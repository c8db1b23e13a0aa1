"""Amortized guides q(z | x) whose family follows the prior's support.

The default, :class:`AmortizedNormal`, is what Pyro's autoguides do for a constrained site: a
diagonal Normal in unconstrained space, pushed through ``biject_to(prior.support)``."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import biject_to, constraints
from torch.nn.functional import softplus


class AmortizedNormal(nn.Module):
    """q(z | x) = T#N(mu(x), diag sigma(x)^2), with T = biject_to(support) (identity on R^d).

    ``encoder`` maps x to 2 * latent_dim numbers: the mean and an unconstrained scale."""

    min_scale = 1e-4

    def __init__(self, encoder: nn.Module, latent_dim: int, support=constraints.real_vector):
        super().__init__()
        self.encoder = encoder
        self.latent_dim = latent_dim
        self.support = support
        self.transform = None if _is_real(support) else biject_to(support)

    def base(self, x: torch.Tensor) -> dist.Distribution:
        h = self.encoder(x)
        loc, raw_scale = h[..., : self.latent_dim], h[..., self.latent_dim :]
        return dist.Normal(loc, self.min_scale + softplus(raw_scale)).to_event(1)

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        base = self.base(x)
        if self.transform is None:
            return base
        return dist.TransformedDistribution(base, [self.transform])

    def location(self, x: torch.Tensor) -> torch.Tensor:
        """A point summary of q(z | x): the transformed mean of the base Normal."""
        loc = self.base(x).base_dist.loc
        return loc if self.transform is None else self.transform(loc)


def _is_real(support) -> bool:
    base = support
    while isinstance(base, constraints.independent):
        base = base.base_constraint
    return base is constraints.real


def encoder_outputs(latent_dim: int) -> int:
    """How many numbers the encoder must produce for the default guide."""
    return 2 * latent_dim
