"""The ELBO of the VAE's Pyro model, computed straight from the distributions its sites use.

:class:`~pyro_vae.models.vae.VAE` is a Pyro model with two sites, ``z ~ p(z)`` and ``x ~ p(x | z)``,
and a guide with one, ``z ~ q(z | x)``; every guide family is reparameterised. For such a model
Pyro's estimators reduce to tensor arithmetic on three densities. With z_k = the guide's rsample
(k = 1..K particles) and beta the KL weight of :class:`~pyro_vae.inference.objectives.ScaleSite`,

    w_k(x)  = log p(x | z_k) + beta (log p(z_k) - log q(z_k | x))         (trace, iwae)
    w_k(x)  = log p(x | z_k) - beta KL(q(z | x) || p(z))                  (analytic: closed-form KL)

    trace     loss = -(1/K) sum_n sum_k w_k(x_n)                          = Trace_ELBO
    analytic  the same with the analytic w                                = TraceMeanField_ELBO
    iwae      loss = -sum_n (logsumexp_k w_k(x_n) - log K)                = RenyiELBO(alpha=0)

and the gradient of each loss is Pyro's surrogate gradient (all sites reparameterised, so the
surrogate is the loss itself). The draws are the ones Pyro makes: the guide's rsample with K
particles in front of the data dimension, in the same order, so on the same random stream both give
the same loss to rounding (tests/test_direct.py checks every built-in prior and guide family against
Pyro's ELBOs). What is left out is Pyro's machinery around the arithmetic: the trace, its messages,
the per-site bookkeeping, which costs time on every step and which torch.jit's tracer (deprecated in
torch 2.14) and torch.compile's graph capture stumble over.

:func:`why_not_direct` says where this does not hold, and Pyro's own ELBO runs instead: a prior whose
discrete site TraceEnum_ELBO sums out (``mog-enum``), a prior of your own whose ``forward()`` samples
Pyro sites of its own, or a guide without a reparameterised sampler.
"""

from __future__ import annotations

import math

import torch
from pyro import poutine
from torch.distributions import kl_divergence

from ..errors import PyroVAEError
from ..models.guides import AmortizedGuide, draw_with_log_prob
from ..models.likelihoods import Likelihood
from ..numerics import logsumexp

DIRECT_OBJECTIVES = ("trace", "analytic", "iwae")


def why_not_direct(vae, x: torch.Tensor | None = None) -> str | None:
    """Why the ELBO of ``vae`` cannot be computed directly (None: it can). With a batch ``x``, also whether
    the guide's distribution at ``x`` has a reparameterised sampler (training needs one; evaluation, drawing
    without gradients, does not)."""
    if vae.prior.enumerated:
        return "the prior's discrete site c is summed out by Pyro's TraceEnum_ELBO"
    with torch.no_grad():
        sites = [name for name, site in poutine.trace(vae.prior).get_trace().nodes.items()
                 if site["type"] == "sample"]
        if sites:
            return f"the prior samples Pyro sites of its own ({', '.join(sites)}), which Pyro's ELBO keeps"
        q = vae.guide_dist(x) if x is not None else None
    if q is not None and not q.has_rsample:
        return f"the guide's {type(q).__name__} has no reparameterised sampler"
    return None


def direct_log_weights(vae, x: torch.Tensor, num_particles: int | None = None, beta=1.0,
                       analytic: bool = False) -> torch.Tensor:
    """w_k(x_n) as in the module docstring, differentiable: shape (K, N), or (N,) for ``num_particles=None``
    (one draw, as Pyro's ELBOs make for K = 1).

    The densities come from the parts' tensor functions where they have them, the distributions'
    ``log_prob`` otherwise: the guide's ``rsample_with_log_prob`` (the diagonal Normal's writes log q in
    the draw's noise), the prior's ``log_density`` (N(0, I) by hand) and the likelihood's ``log_density``
    (Bernoulli as BCE with logits); each is the same number as the distribution's, by fewer operations."""
    shape = torch.Size() if num_particles is None else torch.Size([num_particles])
    guide = vae.guide_dist
    if analytic:
        q = guide(x)                                                        # batch (N,), event (d,)
        z = q.rsample(shape) if q.has_rsample else q.sample(shape)  # (a guide without rsample is only evaluated)
    elif isinstance(guide, AmortizedGuide):
        z, log_q = guide.rsample_with_log_prob(x, shape)
    else:
        z, log_q = draw_with_log_prob(guide(x), shape)
    out = vae.decoder(z)
    likelihood = vae.likelihood
    log_w = likelihood.log_density(out, x) if isinstance(likelihood, Likelihood) else likelihood(out).log_prob(x)
    kl = kl_divergence(q, vae.prior()) if analytic else log_q - vae.prior.log_density(z)
    return log_w - (kl if isinstance(beta, (int, float)) and beta == 1 else beta * kl)


class DirectELBO:
    """``loss(x, beta)``: minus the objective (trace, analytic or iwae), summed over the batch, with
    ``num_particles`` draws per data point; see the module docstring."""

    def __init__(self, vae, objective: str = "trace", num_particles: int = 1):
        if objective not in DIRECT_OBJECTIVES:
            raise PyroVAEError(f"unknown objective {objective!r}; choose one of {', '.join(DIRECT_OBJECTIVES)}")
        self.vae, self.objective, self.num_particles = vae, objective, num_particles

    def __call__(self, x: torch.Tensor, beta) -> torch.Tensor:
        k = self.num_particles
        log_w = direct_log_weights(self.vae, x, None if k == 1 else k, beta, analytic=self.objective == "analytic")
        if self.objective == "iwae" and k > 1:
            return -(logsumexp(log_w, 0) - math.log(k)).sum()
        return -log_w.sum() if k == 1 else -log_w.sum() / k


__all__ = ["DirectELBO", "direct_log_weights", "why_not_direct", "DIRECT_OBJECTIVES"]
