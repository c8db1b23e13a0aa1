"""The non-amortized guide of Cremer, Li & Duvenaud (2018): the amortized guide's own family fit to
each data point alone, so that the gap log p(x) - ELBO splits into what the family cannot do (the
approximation gap) and what the encoder does not do (the amortization gap).

:func:`pointwise_guide` replaces the encoder by one free row of parameters per data point, started at
the encoder's outputs for x_n and moved by L-BFGS on that point's ELBO.
"""

from __future__ import annotations

import copy

import pyro
import torch
from pyro.infer import Trace_ELBO
from torch import nn

from ..errors import PyroVAEError
from ..seeding import seeded
from .mcmc import single_thread
from .tracking import bar as _bar


class FreeOutputs(nn.Module):
    """Stands in for an encoder: returns one free row of parameters per data point, whatever x is."""

    def __init__(self, initial: torch.Tensor):
        super().__init__()
        self.outputs = nn.Parameter(initial.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] != self.outputs.shape[0]:
            raise PyroVAEError(f"this per-point guide was fit to {self.outputs.shape[0]} data points, "
                               f"got a batch of {x.shape[-2]}")
        return self.outputs


def pointwise_guide(vae, x: torch.Tensor, max_iter: int = 200, num_particles: int = 1024, seed: int = 0,
                    progress: bool = True):
    """A copy of ``vae`` whose guide is the amortized guide's family fit to each row of ``x`` alone.

    The guide module must compute its parameters as ``self.encoder(x)`` (as
    :class:`~pyro_vae.models.guides.AmortizedNormal` does): the encoder is replaced by one free row of
    parameters per data point, started at the encoder's outputs, and L-BFGS (at most ``max_iter``
    iterations, strong-Wolfe line search) maximises the ELBO (``Trace_ELBO`` over ``num_particles``
    vectorized draws). The draws' noise is fixed for the whole optimisation (the same seed for every
    evaluation: a sample-average approximation), which makes the objective smooth and deterministic;
    its optimum is within O(1/num_particles) nats of the exact one. Data points do not interact: each
    row only enters its own ELBO. The copy's guide only accepts these N data points; ``vae`` itself is
    not changed."""
    for name, value in (("max_iter", max_iter), ("num_particles", num_particles)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PyroVAEError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(getattr(vae.guide_dist, "encoder", None), nn.Module):
        raise PyroVAEError(f"the guide {type(vae.guide_dist).__name__} has no encoder module to replace by "
                           "per-point parameters")
    x = x.to(vae.device)
    fitted = copy.deepcopy(vae)
    with torch.no_grad():
        initial = vae.guide_dist.encoder(x)
    free = FreeOutputs(initial)
    # a guide of its own: the copied prior may hold the copied guide (the VampPrior does), and must keep it
    fitted.guide_dist = copy.deepcopy(vae.guide_dist)
    fitted.guide_dist.encoder = free
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    optim = torch.optim.LBFGS([free.outputs], lr=1.0, max_iter=max_iter, tolerance_grad=1e-6,
                              tolerance_change=1e-9, history_size=20, line_search_fn="strong_wolfe")
    bar = _bar(total=max_iter, enabled=progress, desc="per-point guide", unit="eval", dynamic_ncols=True)
    best = {"loss": float("inf")}

    def closure():
        optim.zero_grad()
        with seeded(seed, x.device):
            loss = elbo.differentiable_loss(fitted.model, fitted.guide, x)
        loss.backward()
        best["loss"] = min(best["loss"], loss.item())
        if bar.n < bar.total:
            bar.update()
        bar.set_postfix(elbo=f"{-best['loss'] / len(x):.3f}", refresh=False)
        return loss

    others = [p for p in fitted.parameters() if p is not free.outputs]
    for p in others:
        p.requires_grad_(False)
    fitted.eval()
    try:
        with pyro.validation_enabled(False), single_thread():
            optim.step(closure)
        bar.total = bar.n  # converged early: show the bar as complete
        bar.refresh()
    finally:
        bar.close()
    if not torch.isfinite(free.outputs).all():
        raise PyroVAEError("the per-point guide's optimisation diverged (non-finite parameters)")
    free.outputs.requires_grad_(False)
    return fitted


__all__ = ["pointwise_guide", "FreeOutputs"]
