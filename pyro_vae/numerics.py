"""Numerics shared by the densities and the estimators.

:func:`logsumexp` is ``torch.logsumexp`` without its slow path. With m = max_k x_k,

    log sum_k exp(x_k) = m + log sum_k exp(x_k - m),

and every term with x_k - m below log(tiny) + 1 (tiny: the smallest normal number of the dtype, so
about -86.3 in float32 and -707.4 in float64) is set to 0 instead of being computed: its exponential
would be a subnormal number or zero, which the vectorised exp of a CPU build computes 14 to 40 times
more slowly than a normal one (measured on this project's x86-64 machine, torch 2.14: 50,000 exps in
46 us for arguments in [-87, -80], 1.9 ms in [-100, -88], 0.64 ms below -110). The sum loses at most
K * exp(log(tiny) + 1), about 3e-38 * K in float32, relative to its largest term, which is 1: nothing a
float32 sum can hold. Mixture log-densities (500 components, most far from a given z) and importance
weights (thousands of draws spread over hundreds of nats) are exactly where most terms underflow.
-inf, +inf and NaN behave as in ``torch.logsumexp``.
"""

from __future__ import annotations

import math

import torch


def logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """log sum exp(x) over ``dim`` (removed), as ``torch.logsumexp``; terms that would underflow are 0."""
    low = math.log(torch.finfo(x.dtype).tiny) + 1.0
    m = x.detach().amax(dim, keepdim=True)
    m = m.masked_fill(~torch.isfinite(m), 0.0)  # all -inf (or a +inf) in a row: shift by 0
    shifted = x - m
    terms = torch.where(shifted < low, 0.0, shifted.clamp(min=low).exp())  # NaN fails the test and stays NaN
    return terms.sum(dim).log() + m.squeeze(dim)


__all__ = ["logsumexp"]
