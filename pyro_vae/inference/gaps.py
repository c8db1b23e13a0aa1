"""The gaps of Cremer, Li & Duvenaud (2018), "Inference suboptimality in variational autoencoders",
per data point, in nats:

    gap              = log p(x) - ELBO(amortized q)
    approximation    = log p(x) - ELBO(optimised q)          the family's limit
    amortization     = ELBO(optimised q) - ELBO(amortized q)  the encoder's shortfall

ELBOs are Monte Carlo means over K draws (the two guides reparametrise the same base noise, so the
amortization gap, their difference, is precise); log p(x) is the importance-weighted estimate
log (1/K) sum_k p(x, z_k) / r(z_k | x), a stochastic lower bound that tightens as K grows and as the
proposal r nears the posterior. r is a Student-t fit to the NUTS draws (so it covers the posterior's
correlations, which a mean-field guide misses, and with heavier tails), else the optimised guide.
"""

from __future__ import annotations

import math

import numpy as np
import pyro.distributions as dist
import torch

from ..errors import PyroVAEError
from ..numerics import logsumexp
from ..seeding import seeded
from .mcmc import SphereProjection, is_plain_vae, unconstrained_log_joint
from .metrics import log_weights
from .settings import SEEDS


@torch.no_grad()
def chunked_log_weights(vae, x: torch.Tensor, num_particles: int, chunk: int = 500) -> torch.Tensor:
    """:func:`~pyro_vae.inference.metrics.log_weights` in chunks of particles, shape (K, N), float64."""
    parts, left = [], num_particles
    while left > 0:
        k = min(chunk, left)
        parts.append(log_weights(vae, x, k).double())
        left -= k
    return torch.cat(parts)


def _log_mean_exp(lw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per column: log mean exp(lw), its delta-method standard error, and Kish's effective sample size."""
    k = lw.shape[0]
    shifted = torch.exp(lw - lw.max(0).values)
    mean = shifted.mean(0)
    stderr = shifted.std(0) / math.sqrt(k) / mean
    ess = shifted.sum(0) ** 2 / (shifted**2).sum(0)
    return logsumexp(lw, 0) - math.log(k), stderr, ess


@torch.no_grad()
def nuts_proposal_log_weights(vae, x: torch.Tensor, nuts_z: torch.Tensor, num_particles: int, df: float = 5.0,
                              chunk: int = 500) -> torch.Tensor:
    """Importance log-weights log p(x, z_k) - log r(z_k), shape (K, N), float64, from a proposal r fit to
    the NUTS draws: per data point a multivariate Student-t (``df`` degrees of freedom, so heavier
    tails and a wider spread than the draws) with their mean and covariance, in the unconstrained
    space u = biject_to(support)^-1(z) where the density of z carries the Jacobian. A proposal that
    covers the whole posterior: its log-mean-exp estimates log p(x) much more tightly than a
    mean-field guide's (which is too narrow when the posterior is correlated). On the sphere the
    proposal is a power spherical per data point, fit to the draws' mean direction and mean resultant
    length with half the concentration (:func:`sphere_proposal_log_weights`)."""
    log_joint, transform = unconstrained_log_joint(vae, x)
    if isinstance(transform, SphereProjection):
        return sphere_proposal_log_weights(vae, x, nuts_z, num_particles, chunk)
    u = transform.inv(nuts_z.to(x.device)).double()  # (chain, draw, N, d_u)
    u = u.reshape(-1, *u.shape[2:])
    proposals = []
    for n in range(u.shape[1]):
        un = u[:, n][torch.isfinite(u[:, n]).all(-1)]
        if len(un) <= un.shape[-1] + 1:
            raise PyroVAEError(f"too few finite NUTS draws ({len(un)}) to fit an importance proposal")
        loc = un.mean(0)
        cov = torch.cov(un.T).reshape(un.shape[-1], un.shape[-1])
        jitter = 1e-8 * cov.diagonal().mean().clamp_min(1e-12)
        cov = cov + jitter * torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
        proposals.append((loc, torch.linalg.cholesky(cov)))
    loc = torch.stack([p[0] for p in proposals])
    tril = torch.stack([p[1] for p in proposals])
    proposal = dist.MultivariateStudentT(torch.tensor(df, dtype=loc.dtype, device=loc.device), loc, tril)
    parts, left = [], num_particles
    while left > 0:
        k = min(chunk, left)
        uk = proposal.sample((k,))  # (k, N, d_u), float64
        lw = log_joint(uk.to(x.dtype)).double() - proposal.log_prob(uk)
        parts.append(lw)
        left -= k
    return torch.cat(parts)


@torch.no_grad()
def sphere_proposal_log_weights(vae, x: torch.Tensor, nuts_z: torch.Tensor, num_particles: int,
                                chunk: int = 500) -> torch.Tensor:
    """log p(x, z_k) - log r(z_k), shape (K, N), float64, z_k ~ r = PowerSpherical(mu_n, kappa_n / 2) per
    data point: mu_n the NUTS draws' mean direction, kappa_n matching their mean resultant length R
    (E[mu^T z] = (a - b) / (a + b), b = (d - 1) / 2, a = b + kappa), halved for heavier tails."""
    from ..models.sphere import PowerSpherical

    z = nuts_z.to(x.device).double().reshape(-1, *nuts_z.shape[2:])  # (draws, N, d)
    mean = z.mean(0)
    length = mean.norm(dim=-1).clamp(1e-6, 1 - 1e-6)
    b = (z.shape[-1] - 1) / 2
    kappa = 0.5 * (b * (1 + length) / (1 - length) - b).clamp_min(1e-3)
    proposal = PowerSpherical(mean / mean.norm(dim=-1, keepdim=True), kappa)
    prior = vae.prior()
    parts, left = [], num_particles
    while left > 0:
        k = min(chunk, left)
        zk = proposal.rsample((k,))  # (k, N, d)
        zx = zk.to(x.dtype)
        log_p = prior.log_prob(zx) + vae.likelihood(vae.decoder(zx)).log_prob(x)
        parts.append(log_p.double() - proposal.log_prob(zk))
        left -= k
    return torch.cat(parts)


def compute_gaps(vae, fitted, x: torch.Tensor, indices, labels=None, num_particles: int = 5000, seed: int = 0,
                 nuts_z: torch.Tensor | None = None) -> dict:
    """The ELBOs, log p(x) and the gaps per data point (see the module docstring), as a JSON-ready dict.

    ``fitted``: the VAE with the per-point guide from :func:`pointwise_guide`, or None (then only the
    total gap). log p(x) is estimated by importance sampling with K = ``num_particles`` draws from the
    best proposal available: one fit to the NUTS draws ``nuts_z`` (:func:`nuts_proposal_log_weights`;
    plain VAEs only), else the optimised guide, else the amortized guide. The estimates from the other
    proposals are kept beside it (``log_px_<proposal>_proposal``)."""
    estimates = {}
    with seeded(seed * 1000 + SEEDS["amortized_weights"], x.device):
        lw_amortized = chunked_log_weights(vae, x, num_particles)
    elbo_amortized = lw_amortized.mean(0)
    elbo_amortized_se = lw_amortized.std(0) / math.sqrt(num_particles)
    estimates["amortized"] = _log_mean_exp(lw_amortized)
    if fitted is not None:
        # the same seed as the amortized guide's: common random numbers (the same base noise reparametrised
        # by both guides), so the amortization gap, a difference of the two ELBOs, has a small Monte Carlo error
        with seeded(seed * 1000 + SEEDS["amortized_weights"], x.device):
            lw_optimised = chunked_log_weights(fitted, x, num_particles)
        elbo_optimised = lw_optimised.mean(0)
        elbo_optimised_se = lw_optimised.std(0) / math.sqrt(num_particles)
        amortization_se = (lw_optimised - lw_amortized).std(0) / math.sqrt(num_particles)
        estimates["optimised"] = _log_mean_exp(lw_optimised)
    if nuts_z is not None and is_plain_vae(vae):
        with seeded(seed * 1000 + SEEDS["nuts_weights"], x.device):
            estimates["nuts"] = _log_mean_exp(nuts_proposal_log_weights(vae, x, nuts_z, num_particles))
    chosen = next(k for k in ("nuts", "optimised", "amortized") if k in estimates)
    log_px, log_px_se, ess = estimates[chosen]
    rows = []
    for n in range(len(x)):
        row = {"obs": int(indices[n])}
        if labels is not None:
            row["label"] = int(labels[n])
        row.update(log_px=log_px[n].item(), log_px_stderr=log_px_se[n].item(), importance_ess=ess[n].item())
        row.update({f"log_px_{k}_proposal": v[0][n].item() for k, v in estimates.items() if k != chosen})
        row.update(elbo_amortized=elbo_amortized[n].item(), elbo_amortized_stderr=elbo_amortized_se[n].item(),
                   gap=(log_px[n] - elbo_amortized[n]).item())
        if fitted is not None:
            row.update(elbo_optimised=elbo_optimised[n].item(), elbo_optimised_stderr=elbo_optimised_se[n].item(),
                       approximation_gap=(log_px[n] - elbo_optimised[n]).item(),
                       approximation_gap_stderr=math.hypot(log_px_se[n].item(), elbo_optimised_se[n].item()),
                       amortization_gap=(elbo_optimised[n] - elbo_amortized[n]).item(),
                       amortization_gap_stderr=amortization_se[n].item())
        rows.append(row)
    keys = ["log_px", "elbo_amortized", "gap"] + (["elbo_optimised", "approximation_gap", "amortization_gap"]
                                                  if fitted is not None else [])
    values = {k: np.array([r[k] for r in rows]) for k in keys}
    described = {"nuts": "a multivariate Student-t (df 5) fit to the NUTS draws, in unconstrained space",
                 "optimised": "the optimised per-point guide", "amortized": "the amortized guide"}
    return {
        "units": "nats per data point",
        "num_particles": num_particles,
        "log_px_estimator": f"importance weighted, proposal: {described[chosen]}",
        "definitions": {
            "gap": "log p(x) - ELBO(amortized guide)",
            "approximation_gap": "log p(x) - ELBO(guide of the same family optimised for this x)",
            "amortization_gap": "ELBO(optimised guide) - ELBO(amortized guide)",
        },
        "per_obs": rows,
        "mean": {k: float(v.mean()) for k, v in values.items()},
        "stderr_over_obs": {k: (float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None)
                            for k, v in values.items()},
    }


__all__ = ["compute_gaps", "chunked_log_weights", "nuts_proposal_log_weights"]
