"""Mixture priors: a learned mixture of Gaussians (marginal or with its component enumerated) and the
VampPrior, a mixture of the encoder's own posteriors at learned pseudo-inputs."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn

from ..config import Config
from ..errors import PyroVAEError
from .base import Prior

_DEFAULTS = Config()


def _mixture_init(components: int, latent_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    means = torch.randn(components, latent_dim, generator=torch.Generator().manual_seed(0))
    return means, torch.full((components, latent_dim), 0.5)


class MixtureOfGaussians(Prior):
    """p(z) = sum_k pi_k N(z; mu_k, diag sigma_k^2), K components; weights, means and scales are
    learned, or fixed (uniform weights, means from a fixed seed, sigma = 0.5) with ``learnable=False``."""

    traceable = True

    def __init__(self, latent_dim: int, components: int = _DEFAULTS.prior_components,
                 learnable: bool = _DEFAULTS.prior_learnable):
        super().__init__()
        means, scales = _mixture_init(components, latent_dim)
        tensors = {"logits": torch.zeros(components), "means": means, "log_scales": scales.log()}
        for name, value in tensors.items():
            if learnable:
                setattr(self, name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    def component_weights(self) -> dist.Categorical:
        return dist.Categorical(logits=self.logits)

    def components(self) -> dist.Distribution:
        return dist.Normal(self.means, self.log_scales.exp()).to_event(1)

    def forward(self):
        return dist.MixtureSameFamily(self.component_weights(), self.components())


class EnumeratedMixture(MixtureOfGaussians):
    """The mixture of Gaussians with its component as an explicit discrete latent:

        c ~ Categorical(pi),   z | c ~ N(mu_c, diag sigma_c^2)

    ``forward()`` is the marginal p(z) (for sampling and metrics); the training model uses
    :meth:`model_dist`, whose site ``"c"`` TraceEnum_ELBO sums out exactly."""

    enumerated = True

    def model_dist(self) -> dist.Distribution:
        c = pyro.sample("c", self.component_weights(), infer={"enumerate": "parallel"})
        return dist.Normal(self.means[c], self.log_scales.exp()[c]).to_event(1)


class VampPrior(Prior):
    """p(z) = (1/K) sum_k q(z | u_k): the encoder's posteriors at K learned pseudo-inputs
    u_k in [0, 1]^D (Tomczak & Welling 2018). :meth:`attach` receives the guide before use."""

    support = constraints.real_vector
    needs_guide = True
    traceable = True

    def __init__(self, latent_dim: int, data_dim: int, components: int = _DEFAULTS.prior_components):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.raw_pseudo_inputs = nn.Parameter(-1.0 + 0.1 * torch.randn(components, data_dim, generator=gen))
        self._guide: list = []  # held outside the module tree: the guide's parameters belong to the guide

    def attach(self, guide: nn.Module) -> None:
        self._guide[:] = [guide]

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        return torch.sigmoid(self.raw_pseudo_inputs)

    def forward(self):
        if not self._guide:
            raise PyroVAEError("the VampPrior needs the guide: call prior.attach(guide) first")
        q = self._guide[0](self.pseudo_inputs)  # batch (K,), event (d,)
        weights = dist.Categorical(logits=torch.zeros(q.batch_shape, device=self.raw_pseudo_inputs.device))
        return dist.MixtureSameFamily(weights, q)
