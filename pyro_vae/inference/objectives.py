"""Training objectives: which ELBO, and the KL weight beta with its linear warm-up.

    ELBO(x)     = E_q[log p(x | z)] - KL(q(z | x) || p(z))
    beta-ELBO   = E_q[log p(x | z)] - beta * KL(...)        (beta = 0: a plain autoencoder)

beta multiplies the log-densities of the ``"z"`` site in model and guide alike, which scales
exactly the KL term (Monte Carlo or analytic) and nothing else.
"""

from __future__ import annotations

import torch
from pyro.infer import (ELBO, JitTrace_ELBO, JitTraceEnum_ELBO, JitTraceMeanField_ELBO, RenyiELBO, Trace_ELBO,
                        TraceEnum_ELBO, TraceMeanField_ELBO)
from pyro.poutine.messenger import Messenger
from torch.distributions import kl_divergence

from ..errors import PyroVAEError


def make_elbo(objective: str, num_particles: int = 1, enumerated: bool = False, jit: bool = False) -> ELBO:
    """``trace``: Trace_ELBO (TraceEnum_ELBO when the model has a discrete site to sum out);
    ``analytic``: TraceMeanField_ELBO (closed-form KL where registered);
    ``iwae``: RenyiELBO(alpha=0), the importance-weighted bound with K = num_particles.
    ``jit``: the torch.jit-compiled twin (JitTrace_ELBO, ...), for trace and analytic."""
    common = dict(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    if objective == "trace":
        if enumerated:
            return (JitTraceEnum_ELBO if jit else TraceEnum_ELBO)(**common)
        return (JitTrace_ELBO if jit else Trace_ELBO)(**common)
    if objective == "analytic":
        return (JitTraceMeanField_ELBO if jit else TraceMeanField_ELBO)(**common)
    if objective == "iwae":
        if jit:
            raise PyroVAEError("--jit has no compiled version of the iwae objective (RenyiELBO): drop --jit")
        return RenyiELBO(alpha=0.0, **common)
    raise PyroVAEError(f"unknown objective {objective!r}; choose trace, analytic or iwae")


def check_objective(config, vae, x: torch.Tensor) -> None:
    """Refuse, before training, an objective the (guide, prior) pair cannot support."""
    if vae.enumerated:
        if config.objective != "trace":
            raise PyroVAEError(f"the prior {config.prior!r} has a discrete site summed out by TraceEnum_ELBO; "
                               f"--objective {config.objective} cannot enumerate it: use --objective trace")
        if config.beta != 1.0 or config.warmup_epochs:
            raise PyroVAEError(f"the prior {config.prior!r} is trained with TraceEnum_ELBO, where beta and "
                               "warm-up would scale log p(z | c), not the KL: use beta 1 without warm-up")
    if config.jit and (config.warmup_epochs or config.objective == "iwae"):
        raise PyroVAEError("--jit compiles beta into the objective and has no iwae version: "
                           "use it without --warmup-epochs, with --objective trace or analytic")
    if config.objective == "analytic":
        check_analytic_kl(vae, x)


class KLWeight:
    """beta(t) = beta * min(1, t / warmup_epochs), t in (fractional) epochs."""

    def __init__(self, beta: float, warmup_epochs: float = 0.0):
        self.beta = beta
        self.warmup_epochs = warmup_epochs
        self.value = beta if warmup_epochs == 0 else 0.0

    def update(self, epoch_progress: float) -> float:
        if self.warmup_epochs > 0:
            self.value = self.beta * min(1.0, epoch_progress / self.warmup_epochs)
        return self.value


class ScaleSite(Messenger):
    """Multiply one sample site's log-density by ``weight.value`` (which may be 0, unlike poutine.scale)."""

    def __init__(self, site: str, weight: KLWeight):
        super().__init__()
        self.site = site
        self.weight = weight

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and msg["name"] == self.site:
            msg["scale"] = msg["scale"] * self.weight.value


def kl_weighted(fn, weight: KLWeight, site: str = "z"):
    """``fn`` (a model or guide) with the log-density of ``site`` scaled by the KL weight."""

    def wrapped(*args, **kwargs):
        with ScaleSite(site, weight):
            return fn(*args, **kwargs)

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


__all__ = ["make_elbo", "check_objective", "KLWeight", "ScaleSite", "kl_weighted", "check_analytic_kl"]
