"""The VAE as a Pyro model and guide.

    model(x):  z_n ~ p(z),            x_n ~ p(x | z_n)      for n in plate("data")
    guide(x):  z_n ~ q(z | x_n)                              (amortized by the encoder)

Sample sites are always named ``"z"`` and ``"x"`` so that poutine handlers (scale for beta,
condition, trace) and the ArviZ conversion work for every prior. A prior with a discrete
component (``prior.enumerated``) adds a site ``"c"`` in :meth:`VAE.enumerated_model`, which
TraceEnum_ELBO sums out exactly; :meth:`VAE.model` always uses the marginal p(z).
"""

from __future__ import annotations

import pyro
import torch
from torch import nn

from ..config import Config
from .guides import build_guide
from .likelihoods import build_likelihood
from .networks import build_networks
from .base import Prior, check_prior
from .priors import PriorOptions, build_prior
from .sizes import check_model_fits


class VAE(nn.Module):
    """A VAE made of a prior, an amortized guide, a decoder and a likelihood."""

    def __init__(self, prior: Prior, guide: nn.Module, decoder: nn.Module, likelihood: nn.Module,
                 latent_dim: int, image_shape: tuple[int, int]):
        super().__init__()
        self.prior = prior
        self.guide_dist = guide
        self.decoder = decoder
        self.likelihood = likelihood
        self.latent_dim = latent_dim
        self.image_shape = tuple(image_shape)

    @property
    def enumerated(self) -> bool:
        return self.prior.enumerated

    def model(self, x: torch.Tensor) -> None:
        self._model(x, self.prior)

    def enumerated_model(self, x: torch.Tensor) -> None:
        """The model with the prior's discrete component c as a site to enumerate (TraceEnum_ELBO)."""
        self._model(x, self.prior.model_dist)

    def _model(self, x: torch.Tensor, prior_dist) -> None:
        pyro.module("vae", self)
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", prior_dist())
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("vae", self)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", self.guide_dist(x))

    @property
    def data_dim(self) -> int:
        """D, the number of pixels of an image."""
        return self.image_shape[0] * self.image_shape[1]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """E[x | z], the mean image under the likelihood."""
        return self.likelihood(self.decoder(z)).mean

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """A point summary of q(z | x) (the posterior mean for the Normal guide)."""
        return self.guide_dist.location(x)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Decode n draws z ~ p(z): the VAE as a generator."""
        return self.decode(self.prior().sample((n,)))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def build_vae(config: Config, data_dim: int, image_shape, binary: bool, prior=None, *,
              trust_prior: bool = True) -> VAE:
    """Build the VAE a config describes. ``prior`` overrides ``config.prior`` with an object.
    ``trust_prior=False`` (a config read from a file) refuses to import a prior named module:attribute."""
    d = config.latent_dim
    check_model_fits(config, data_dim)
    options = PriorOptions.from_config(config, data_dim)
    prior_module = build_prior(config.prior if prior is None else prior, d, options,
                               allow_import=trust_prior or prior is not None)
    likelihood = build_likelihood(config.likelihood, data_dim, binary, config.binarize)
    decoder = None

    def encoder_factory(outputs: int) -> nn.Module:
        nonlocal decoder
        encoder, decoder = build_networks(config.network, data_dim, image_shape, d, config.hidden_dim,
                                          config.hidden_layers, encoder_out=outputs, decoder_out=data_dim,
                                          decoder_hidden_dim=config.decoder_hidden_dim or None)
        return encoder

    guide = build_guide(config.guide, encoder_factory, d, prior_module, temperature=config.prior_temperature,
                        flow_layers=config.guide_flow_layers, scale=config.guide_scale)
    if prior_module.needs_guide:
        prior_module.attach(guide)
        check_prior(prior_module, d)
    return VAE(prior_module, guide, decoder, likelihood, d, image_shape)
