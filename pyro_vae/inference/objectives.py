"""Training objectives: which ELBO, and the KL weight beta with its linear warm-up.

    ELBO(x)     = E_q[log p(x | z)] - KL(q(z | x) || p(z))
    beta-ELBO   = E_q[log p(x | z)] - beta * KL(...)        (beta = 0: a plain autoencoder)

beta multiplies the log-densities of the ``"z"`` site in model and guide alike, which scales
exactly the KL term (Monte Carlo or analytic) and nothing else. (Under the iwae objective it
scales log p(z) - log q(z|x) inside each importance weight, which is not a KL weight.)

Where the tracer handles the model (:func:`why_not_compiled`), training compiles the ELBO with
torch.jit (Pyro's JitTrace_ELBO and friends): the Python work of tracing the model and guide is
then done once instead of every step.
"""

from __future__ import annotations

import torch
from pyro.infer import (ELBO, JitTrace_ELBO, JitTraceEnum_ELBO, JitTraceMeanField_ELBO, RenyiELBO, Trace_ELBO,
                        TraceEnum_ELBO, TraceMeanField_ELBO)
from pyro.poutine.messenger import Messenger
from torch.distributions import kl_divergence

from ..errors import PyroVAEError

OBJECTIVES = ("trace", "analytic", "iwae")
"""The objectives ``--objective`` names (see :func:`make_elbo`)."""


class CachedJitTraceMeanField_ELBO(JitTraceMeanField_ELBO):
    """JitTraceMeanField_ELBO, traced once. Pyro 1.9.2 stores the compiled loss as ``_differentiable_loss``
    but looks for ``_loss_and_surrogate_loss``, so it traces the model again on every step (slower
    than not compiling at all); this sets the name it looks for."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss = super().differentiable_loss(model, guide, *args, **kwargs)
        self._loss_and_surrogate_loss = self._differentiable_loss
        return loss


def make_elbo(objective: str, num_particles: int = 1, enumerated: bool = False, jit: bool = False) -> ELBO:
    """``trace``: Trace_ELBO (TraceEnum_ELBO when the model has a discrete site to sum out);
    ``analytic``: TraceMeanField_ELBO (closed-form KL where registered);
    ``iwae``: RenyiELBO(alpha=0), the importance-weighted bound with K = num_particles.
    ``jit``: the torch.jit-compiled twin (JitTrace_ELBO, ...), for trace and analytic."""
    common = dict(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    # the tracer's warnings come from shape checks in the distributions, which the trace may drop;
    # check_trace would run the model twice more at compile time
    compiled = dict(common, ignore_jit_warnings=True, jit_options={"check_trace": False})
    if objective == "trace":
        if enumerated:
            return JitTraceEnum_ELBO(**compiled) if jit else TraceEnum_ELBO(**common)
        return JitTrace_ELBO(**compiled) if jit else Trace_ELBO(**common)
    if objective == "analytic":
        return CachedJitTraceMeanField_ELBO(**compiled) if jit else TraceMeanField_ELBO(**common)
    if objective == "iwae":
        if jit:
            raise PyroVAEError("the iwae objective (RenyiELBO) has no compiled version: train it with --no-jit")
        return RenyiELBO(alpha=0.0, **common)
    raise PyroVAEError(f"unknown objective {objective!r}; choose trace, analytic or iwae")


def why_not_compiled(config, prior) -> str | None:
    """Why ``config.jit`` does not compile the ELBO of a run with ``prior`` (None: it does). Only priors
    that declare themselves ``traceable`` are compiled: a trace could silently freeze the Python control
    flow of any other."""
    if not config.jit:
        return "--no-jit"
    if config.objective == "iwae":
        return "the iwae objective (RenyiELBO) has no compiled version"
    if not prior.traceable:
        return (f"the prior {config.prior!r} is not one the tracer is known to get right "
                f"(compiled: the built-in priors other than flow, and priors that declare traceable = True)")
    return None


def check_objective(config, vae, x: torch.Tensor) -> None:
    """Refuse, before training, an objective the (guide, prior) pair cannot support."""
    if vae.enumerated:
        if config.objective != "trace":
            raise PyroVAEError(f"the prior {config.prior!r} has a discrete site summed out by TraceEnum_ELBO; "
                               f"--objective {config.objective} cannot enumerate it: use --objective trace")
        if config.beta != 1.0 or config.warmup_epochs:
            raise PyroVAEError(f"the prior {config.prior!r} is trained with TraceEnum_ELBO, where beta and "
                               "warm-up would scale log p(z | c), not the KL: use beta 1 without warm-up")
    if config.objective == "analytic":
        check_analytic_kl(vae, x)


class KLWeight:
    """beta(t) = beta * min(1, t / warmup_epochs), t in (fractional) epochs.

    ``tensor`` holds the current value on the training device, updated in place: the models take it
    as an argument, so a compiled ELBO follows the warm-up instead of keeping the value it was traced with."""

    def __init__(self, beta: float, warmup_epochs: float = 0.0, device=None):
        self.beta = beta
        self.warmup_epochs = warmup_epochs
        self.value = beta if warmup_epochs == 0 else 0.0
        self.tensor = torch.tensor(self.value, device=device)

    @property
    def constant_one(self) -> bool:
        """beta = 1 throughout: the plain ELBO, no scaling needed."""
        return self.beta == 1.0 and self.warmup_epochs == 0

    def update(self, epoch_progress: float) -> float:
        if self.warmup_epochs > 0:
            value = self.beta * min(1.0, epoch_progress / self.warmup_epochs)
            if value != self.value:
                self.value = value
                self.tensor.fill_(value)
        return self.value


class ScaleSite(Messenger):
    """Multiply one sample site's log-density by ``weight`` (a number or a tensor; it may be 0, unlike
    poutine.scale)."""

    def __init__(self, site: str, weight):
        super().__init__()
        self.site = site
        self.weight = weight

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and msg["name"] == self.site:
            msg["scale"] = msg["scale"] * self.weight


def kl_weighted(fn, site: str = "z"):
    """``fn(x)`` (a model or guide) as ``fn(x, beta)``, with the log-density of ``site`` scaled by beta."""

    def wrapped(x, beta):
        with ScaleSite(site, beta):
            return fn(x)

    return wrapped


def check_analytic_kl(vae, x: torch.Tensor) -> None:
    """The analytic-KL objective needs KL(q || p) registered for the (guide, prior) pair; say which pair lacks it."""
    q = vae.guide_dist(x[:1])
    p = vae.prior()
    try:
        kl_divergence(q, p)
    except NotImplementedError:
        raise PyroVAEError(
            f"--objective analytic: no closed-form KL is registered for guide {_name(q)} and prior {_name(p)}; "
            "use --objective trace (Monte Carlo KL) instead"
        ) from None


def _name(d) -> str:
    base = getattr(d, "base_dist", None)
    return f"{type(d).__name__}({_name(base)})" if base is not None else type(d).__name__


__all__ = ["OBJECTIVES", "make_elbo", "why_not_compiled", "check_objective", "KLWeight", "ScaleSite", "kl_weighted",
           "check_analytic_kl", "CachedJitTraceMeanField_ELBO"]
