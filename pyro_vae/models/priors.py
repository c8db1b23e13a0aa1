"""Priors p(z). A prior is anything that, called with no arguments, returns a Pyro distribution with
event shape ``(latent_dim,)``: an ``nn.Module`` (whose parameters then train with the model), a
plain callable, or a distribution object itself. :func:`build_prior` is the one seam they all pass."""

from __future__ import annotations

import importlib
from typing import Callable

import pyro.distributions as dist
import torch
from torch import nn

from ..errors import PyroVAEError


class StandardNormal(nn.Module):
    """p(z) = N(0, I)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


class FixedDistribution(nn.Module):
    """Adapts a ready distribution object. Its tensors stay where they were made: to train on
    another device, write the prior as a module that returns the distribution."""

    def __init__(self, distribution: dist.Distribution):
        super().__init__()
        self.distribution = distribution
        self.register_buffer("_device", torch.zeros(()), persistent=False)

    def forward(self) -> dist.Distribution:
        made_on = self.distribution.sample().device if self._device.device.type != "cpu" else self._device.device
        if made_on != self._device.device:
            raise PyroVAEError(
                f"the prior distribution lives on {made_on} but the model on {self._device.device}; "
                "write the prior as an nn.Module that returns it"
            )
        return self.distribution


PRIORS: dict[str, Callable[[int], nn.Module]] = {"normal": StandardNormal}


def build_prior(spec, latent_dim: int) -> nn.Module:
    """A prior module from a built-in name, ``module:attribute``, a distribution, a module or a callable.

    ``module:attribute`` may name a distribution, a module, a class or function taking ``latent_dim``.
    The result is checked: it must return a distribution whose event shape is (latent_dim,)."""
    if isinstance(spec, str):
        if spec in PRIORS:
            prior = PRIORS[spec](latent_dim)
        elif ":" in spec:
            prior = _import_prior(spec, latent_dim)
        else:
            raise PyroVAEError(f"unknown prior {spec!r}; choose one of {', '.join(PRIORS)} or module:attribute")
    else:
        prior = _adapt(spec)
    check_prior(prior, latent_dim)
    return prior


def _import_prior(spec: str, latent_dim: int) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise PyroVAEError(f"cannot import prior {spec!r}: {e}") from None
    if isinstance(obj, type) or (callable(obj) and not isinstance(obj, (nn.Module, dist.Distribution))):
        try:
            made = obj(latent_dim)
        except TypeError:
            made = obj  # a callable taking no arguments that returns the distribution
        obj = made
    return _adapt(obj)


class _CallablePrior(nn.Module):
    def __init__(self, fn: Callable[[], dist.Distribution]):
        super().__init__()
        self.fn = fn

    def forward(self) -> dist.Distribution:
        return self.fn()


def _adapt(obj) -> nn.Module:
    if isinstance(obj, dist.Distribution):
        return FixedDistribution(obj)
    if isinstance(obj, nn.Module):
        return obj
    if callable(obj):
        return _CallablePrior(obj)
    raise PyroVAEError(f"a prior must be a distribution, a module or a callable, got {type(obj).__name__}")


def check_prior(prior: nn.Module, latent_dim: int) -> None:
    """Check the prior returns a distribution of event shape (latent_dim,) whose samples score finitely."""
    try:
        d = prior()
    except PyroVAEError:
        raise
    except Exception as e:
        raise PyroVAEError(f"the prior failed when called: {e}") from None
    if not isinstance(d, torch.distributions.Distribution):
        raise PyroVAEError(f"the prior must return a distribution, got {type(d).__name__}")
    if tuple(d.event_shape) != (latent_dim,):
        raise PyroVAEError(
            f"the prior's event shape {tuple(d.event_shape)} disagrees with latent_dim={latent_dim}"
            " (wrap a univariate prior in .expand([latent_dim]).to_event(1))"
        )
    with torch.no_grad():
        z = d.sample((4,))
        try:
            lp = d.log_prob(z)
        except NotImplementedError:
            raise PyroVAEError("the prior has no log_prob") from None
    if not torch.isfinite(lp).all():
        raise PyroVAEError("the prior gives non-finite log_prob to its own samples")
    if not bool(d.support.check(z).all()):
        raise PyroVAEError("the prior's samples leave its declared support")
