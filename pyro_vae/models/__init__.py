"""The pieces of a VAE: prior, guide, likelihood, networks, and the Pyro model that joins them."""

from .base import Prior
from .guides import AmortizedGuide, AmortizedNormal, build_guide
from .likelihoods import LIKELIHOODS, build_likelihood
from .priors import PRIORS, StandardNormal, build_prior
from .vae import VAE, build_vae

__all__ = ["Prior", "VAE", "build_vae", "AmortizedNormal", "AmortizedGuide", "build_guide", "StandardNormal", "PRIORS", "build_prior",
           "LIKELIHOODS", "build_likelihood"]
