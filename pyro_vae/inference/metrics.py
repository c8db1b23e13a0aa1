"""Estimators of how well a trained VAE fits, per data point.

With K draws z_k ~ q(z | x) and log-weights  w_k = log p(x, z_k) - log q(z_k | x):

    ELBO(x)   ~ (1/K) sum_k w_k
    log p(x) >= log (1/K) sum_k exp(w_k)          (importance weighted; tight as K -> inf)
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample


@torch.no_grad()
def log_weights(vae, x: torch.Tensor, num_particles: int) -> torch.Tensor:
    """w_k(x_n) = log p(x_n, z_k) - log q(z_k | x_n) for z_k ~ q(z | x_n): shape (K, N)."""
    with pyro.plate("particles", num_particles, dim=-2):
        guide_trace = poutine.trace(vae.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    log_w = 0.0
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        trace.compute_log_prob()
        for site in trace.nodes.values():
            if site["type"] == "sample" and not site_is_subsample(site):
                log_w = log_w + sign * site["log_prob"]
    return log_w.expand(num_particles, x.shape[0])


def _batched(fn, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def elbo_per_datapoint(vae, x: torch.Tensor, num_particles: int = 1, batch_size: int = 1000) -> torch.Tensor:
    """The Monte Carlo ELBO of each data point, shape (N,), in nats."""
    return _batched(lambda xb: log_weights(vae, xb, num_particles).mean(0), x, batch_size)


def iw_log_likelihood(vae, x: torch.Tensor, num_particles: int = 1000, batch_size: int = 100) -> torch.Tensor:
    """The importance-weighted estimate of log p(x) of each data point, shape (N,)."""
    return _batched(
        lambda xb: torch.logsumexp(log_weights(vae, xb, num_particles), 0) - math.log(num_particles),
        x,
        batch_size,
    )


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    """The mean over data points and its standard error."""
    values = values.double()
    n = values.numel()
    stderr = values.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return values.mean().item(), stderr
