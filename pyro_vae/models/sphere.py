"""Distributions on the unit sphere S^{d-1} = {z in R^d : |z| = 1}, densities w.r.t. its surface measure.

    Uniform(S^{d-1}):  p(z) = 1 / |S^{d-1}|,   |S^{d-1}| = 2 pi^{d/2} / Gamma(d/2)
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from ..errors import PyroVAEError


def log_sphere_area(d: int) -> float:
    """log |S^{d-1}|, the surface area of the unit sphere in R^d."""
    return math.log(2) + (d / 2) * math.log(math.pi) - math.lgamma(d / 2)


class UniformSphereDistribution(dist.TorchDistribution):
    """The uniform distribution on the unit sphere S^{d-1} in R^d (density w.r.t. surface measure)."""

    arg_constraints = {}
    support = constraints.sphere
    has_rsample = True

    def __init__(self, dim: int, device=None, batch_shape=torch.Size(), validate_args=None):
        if dim < 2:
            raise PyroVAEError("a sphere prior needs latent_dim >= 2")
        self.dim = dim
        self._device = device
        super().__init__(batch_shape, torch.Size([dim]), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return UniformSphereDistribution(self.dim, self._device, torch.Size(batch_shape))

    def rsample(self, sample_shape=torch.Size()):
        x = torch.randn(self._extended_shape(sample_shape), device=self._device)
        return x / x.norm(dim=-1, keepdim=True)

    def log_prob(self, value):
        return torch.full(torch.broadcast_shapes(value.shape[:-1], self.batch_shape), -log_sphere_area(self.dim),
                          device=value.device)
