"""Observation models p(x | z): the decoder's output, one number per pixel, becomes a distribution
over the flattened image (event shape (D,))."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits, softplus

from ..errors import PyroVAEError


class BernoulliPixels(dist.Independent):
    """Bernoulli(logits).to_event(1) with the same density, computed with one full-size pass fewer:

        log p(x | logits) = -sum_d BCE(logits_d, x_d)

    summed before negating. ``Bernoulli.log_prob`` negates the full (particles, batch, pixels)
    tensor before ``Independent`` sums it: with K = 1000 particles that extra pass costs 10% of an
    importance-weighted evaluation."""

    def __init__(self, logits: torch.Tensor, validate_args=None):
        super().__init__(dist.Bernoulli(logits=logits, validate_args=False), 1, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return BernoulliPixels(self.base_dist.logits.expand(batch_shape + self.event_shape),
                               validate_args=self.__dict__.get("_validate_args"))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self.base_dist._validate_sample(value)
        logits, value = torch.broadcast_tensors(self.base_dist.logits, value)
        return binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1).neg()


class Likelihood(nn.Module):
    """The base of an observation model: ``forward(out)`` turns the decoder's output into p(x | z), a Pyro
    distribution with event shape (D,); ``requires_binary`` says whether x must be 0/1."""

    requires_binary = False

    def forward(self, out: torch.Tensor) -> dist.Distribution:  # pragma: no cover - every likelihood defines it
        raise NotImplementedError(f"{type(self).__name__} must return p(x | z) from forward(out)")

    def log_density(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x | z) for the decoder's output ``out`` (x broadcast against it). Default:
        ``self(out).log_prob(x)``; a likelihood may compute the same numbers without the distribution."""
        return self(out).log_prob(x)


class Bernoulli(Likelihood):
    """x_d ~ Bernoulli(sigmoid(f_d(z))): for binary pixels."""

    requires_binary = True

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        return BernoulliPixels(logits, validate_args=False)

    def log_density(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-sum_d BCE(logits_d, x_d), as :class:`BernoulliPixels` computes it, without building it."""
        if x.shape != logits.shape:
            logits, x = torch.broadcast_tensors(logits, x)
        return binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1).neg()


class ContinuousBernoulli(Likelihood):
    """x_d ~ CB(sigmoid(f_d(z))), the normalised Bernoulli density on [0, 1] (Loaiza-Ganem & Cunningham 2019)."""

    requires_binary = False

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        return dist.ContinuousBernoulli(logits=logits).to_event(1)


class Gaussian(Likelihood):
    """x_d ~ N(sigmoid(f_d(z)), sigma_d^2) with a learned per-pixel sigma_d >= min_scale."""

    requires_binary = False

    def __init__(self, data_dim: int, min_scale: float = 0.01):
        super().__init__()
        self.raw_scale = nn.Parameter(torch.zeros(data_dim))
        self.min_scale = min_scale

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        scale = self.min_scale + softplus(self.raw_scale)
        return dist.Normal(torch.sigmoid(out), scale).to_event(1)


LIKELIHOODS = {"bernoulli": Bernoulli, "continuous-bernoulli": ContinuousBernoulli, "gaussian": Gaussian}


def build_likelihood(name: str, data_dim: int, binary: bool, binarize: bool) -> nn.Module:
    """Resolve ``auto`` (Bernoulli for binary data, continuous Bernoulli otherwise) and check the data fit."""
    if name == "auto":
        name = "bernoulli" if (binary or binarize) else "continuous-bernoulli"
    if name not in LIKELIHOODS:
        raise PyroVAEError(f"unknown likelihood {name!r}; choose one of auto, {', '.join(LIKELIHOODS)}")
    cls = LIKELIHOODS[name]
    if cls.requires_binary and not (binary or binarize):
        raise PyroVAEError(
            "the bernoulli likelihood needs binary data, but these pixels are grey levels: "
            "add --binarize, or choose --likelihood continuous-bernoulli or gaussian"
        )
    return cls(data_dim) if cls is Gaussian else cls()
