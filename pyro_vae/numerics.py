"""Numerics shared by the densities and the estimators.

:func:`logsumexp` is ``torch.logsumexp`` without its slow path. With m = max_k x_k,

    log sum_k exp(x_k) = m + log sum_k exp(x_k - m),

and every x_k more than -log(tiny) - 1 below m (tiny: the smallest normal number of the dtype, so about
86.3 nats in float32 and 707.4 in float64) is raised to that floor before the exponentials are taken:
its exponential would be a subnormal number or zero, which the vectorised exp of a CPU build computes
14 to 40 times more slowly than a normal one (measured on this project's x86-64 machine, torch 2.14:
50,000 exps in 46 us for arguments in [-87, -80], 1.9 ms in [-100, -88], 0.64 ms below -110). A raised
term adds at most exp(log(tiny) + 1), about 3e-38 in float32, relative to the largest term, which is 1:
nothing a float32 sum can hold; its gradient (at most as small) becomes 0. Mixture log-densities (500
components, most far from a given z) and importance weights (thousands of draws spread over hundreds
of nats) are exactly where most terms underflow. A 100 x 500 logsumexp with most terms underflowing,
forward and backward: 1.73 ms with torch.logsumexp, 0.67 ms with this (0.36 and 0.65 ms where none do).
-inf, +inf and NaN behave as in ``torch.logsumexp``.
"""

from __future__ import annotations

import math

import torch


def logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """log sum exp(x) over ``dim`` (removed), as ``torch.logsumexp``, with the terms that would underflow
    raised to the smallest normal exponential."""
    floor = x.detach().amax(dim, keepdim=True) + (math.log(torch.finfo(x.dtype).tiny) + 1.0)
    return torch.logsumexp(torch.maximum(x, floor), dim)  # -inf rows stay -inf, NaN stays NaN


__all__ = ["logsumexp"]
