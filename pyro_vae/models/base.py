"""The prior protocol, declared: what a VAE, its guide, the objectives and NUTS may ask of p(z).

A prior is an ``nn.Module`` whose ``forward()`` returns a Pyro distribution with event shape
``(latent_dim,)`` and an empty batch shape; its parameters (if any) train with the model.
:class:`Prior` declares the optional hooks, each with a documented default, so that no caller has
to probe a prior with ``getattr``:

    support          the support of z, when known without calling ``forward()`` (None: ask the
                     distribution). The guide's family follows it.
    traceable        whether the ELBO of a model with this prior may be compiled (torch.compile for the
                     direct ELBO, torch.jit for Pyro's). False by default: a trace freezes Python control
                     flow, so only priors the tests check against the uncompiled ELBO set it (every
                     built-in prior but the flow and the von Mises-Fisher).
    enumerated       True when :meth:`model_dist` adds a discrete site that TraceEnum_ELBO sums out
                     exactly; ``forward()`` stays the marginal p(z), for sampling and metrics.
    needs_guide      True when the prior is made of the guide (the VampPrior): :meth:`attach` is
                     called with the guide before the first ``forward()``.
    preferred_guide  the guide family ``--guide auto`` picks (None: chosen from the support).
    after_epoch      called by the training loop after each epoch's pass over the data, with the guide and
                     a seeded random subset of the training images: a prior that follows the codes acts
                     here (the mixture of Gaussians re-seeds its dead components). Default: nothing.
    log_density(z)   log p(z) as a tensor function of z (default: ``forward().log_prob(z)``); a prior may
                     compute the same numbers with fewer operations (N(0, I) does), which the direct
                     ELBO uses.

A user's prior needs none of this: :func:`as_prior` adapts a distribution, a module returning one,
or a function of no arguments returning one. A plain module is made a :class:`Prior` in place (its
class gains the base, as ``pyro.nn.module.to_pyro_module_`` does for PyroModule), so its parameter
names and any hook it defines itself are kept.
"""

from __future__ import annotations

from typing import Callable

import pyro.distributions as dist
import torch
from torch import nn

from ..errors import PyroVAEError, one_line


class Prior(nn.Module):
    """The base of every prior p(z); see the module docstring for the hooks and their defaults."""

    support = None
    traceable: bool = False
    enumerated: bool = False
    needs_guide: bool = False
    preferred_guide: str | None = None

    def forward(self) -> dist.Distribution:  # pragma: no cover - every prior defines it
        raise NotImplementedError(f"{type(self).__name__} must return p(z) from forward()")

    def model_dist(self) -> dist.Distribution:
        """The distribution the training model samples z from. Default: p(z) itself. An enumerated
        prior samples its discrete site here and returns p(z | c)."""
        return self()

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z), the event dimension summed. Default: ``self().log_prob(z)``."""
        return self().log_prob(z)

    def attach(self, guide: nn.Module) -> None:
        """Receive the guide (only called when ``needs_guide``). Default: nothing to do."""

    def after_epoch(self, guide: nn.Module, x: torch.Tensor, generator: torch.Generator) -> dict | None:
        """Act on the codes of ``x`` (a random subset of the training images) after an epoch; what is
        returned goes into the epoch's record in history.json. Default: nothing."""
        return None

    def initialise_from_data(self, x: torch.Tensor, seed: int) -> None:
        """Set the prior's parameters from training images ``x`` (``--prior-init data``). Default: the
        prior has no such initialisation."""
        raise PyroVAEError(f"--prior-init data is defined for the vamp prior, not for {type(self).__name__}")

    def guide_temperature(self) -> float | None:
        """The temperature a relaxed guide should use to match this prior (None: the configured one)."""
        return None

    def distribution_support(self):
        """The support of z: the declared one, else the distribution's (without calling a prior that
        needs the guide before it is attached, which declares its support)."""
        return self.support if self.support is not None else self().support


class FixedDistribution(Prior):
    """Adapts a ready distribution object. Its tensors stay where they were made: to train on
    another device, write the prior as a module that returns the distribution."""

    def __init__(self, distribution: dist.Distribution):
        super().__init__()
        self.distribution = distribution

    def forward(self) -> dist.Distribution:
        return self.distribution


class CallablePrior(Prior):
    """Adapts a function of no arguments that returns the prior distribution."""

    def __init__(self, fn: Callable[[], dist.Distribution]):
        super().__init__()
        self.fn = fn

    def forward(self) -> dist.Distribution:
        return self.fn()


_PRIOR_CLASSES: dict[type, type] = {}


def _module_as_prior(module: nn.Module) -> Prior:
    """Give a plain module's class the :class:`Prior` base (in place; parameter names unchanged). Hooks
    the class defines come first in the method order, the base's defaults after them."""
    cls = type(module)
    if cls not in _PRIOR_CLASSES:
        _PRIOR_CLASSES[cls] = type(cls.__name__, (cls, Prior), {"__module__": cls.__module__,
                                                             "__qualname__": cls.__qualname__,
                                                             "adapted_from": cls})
    module.__class__ = _PRIOR_CLASSES[cls]
    return module


def as_prior(obj, latent_dim: int) -> Prior:
    """A :class:`Prior` from a prior, a module, a distribution, a function of no arguments, or a function
    or class of ``latent_dim`` returning one of those."""
    if isinstance(obj, Prior):
        return obj
    if isinstance(obj, dist.Distribution):
        return FixedDistribution(obj)
    if isinstance(obj, nn.Module):
        return _module_as_prior(obj)
    if callable(obj):
        if not _takes_an_argument(obj):
            return CallablePrior(obj)
        name = getattr(obj, "__name__", obj)
        try:
            made = obj(latent_dim)
        except PyroVAEError:
            raise
        except Exception as e:
            raise PyroVAEError(f"the prior {name!r}({latent_dim}) failed: {one_line(e)}") from None
        if isinstance(made, (dist.Distribution, nn.Module)):
            return as_prior(made, latent_dim)
        if callable(made):
            return CallablePrior(made)
        raise PyroVAEError(f"the prior {name!r} returned a {type(made).__name__}, not a distribution")
    raise PyroVAEError(f"a prior must be a distribution, a module or a callable, got {type(obj).__name__}")


def _takes_an_argument(fn) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def check_prior(prior: Prior, latent_dim: int) -> None:
    """The prior returns a distribution of event shape (latent_dim,) with a log_prob that is finite
    at its own samples, which lie in its declared support."""
    try:
        d = prior()
    except PyroVAEError:
        raise
    except Exception as e:
        raise PyroVAEError(f"the prior failed when called: {one_line(e)}") from None
    if not isinstance(d, torch.distributions.Distribution):
        raise PyroVAEError(f"the prior must return a distribution, got {type(d).__name__}")
    if tuple(d.event_shape) != (latent_dim,):
        raise PyroVAEError(
            f"the prior's event shape {tuple(d.event_shape)} disagrees with latent_dim={latent_dim}"
            " (make a univariate prior multivariate with .expand([latent_dim]).to_event(1))"
        )
    if tuple(d.batch_shape) != ():
        raise PyroVAEError(f"the prior must have an empty batch shape, got {tuple(d.batch_shape)}")
    with torch.no_grad():
        z = d.sample((16,))
        try:
            lp = d.log_prob(z)
        except NotImplementedError:
            raise PyroVAEError(f"the prior {type(d).__name__} has no log_prob") from None
    if not bool(d.support.check(z).all()):
        raise PyroVAEError(f"the prior's samples leave its declared support {d.support}")
    if tuple(lp.shape) != (16,) or not torch.isfinite(lp).all():
        raise PyroVAEError("the prior's log_prob is not finite (or not one number per sample) at its own samples")
