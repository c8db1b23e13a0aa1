"""pyro_vae.numerics.logsumexp: torch.logsumexp's values, gradients and special values, without computing
the exponentials that underflow."""

import math

import pytest
import torch

from pyro_vae.numerics import logsumexp


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spread", [1.0, 50.0, 2000.0])  # from no term underflowing to nearly all of them
def test_values_and_gradients_equal_torch(dtype, spread):
    gen = torch.Generator().manual_seed(0)
    x = (spread * torch.randn(300, 500, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
    for dim in (0, -1):
        ours, theirs = logsumexp(x, dim), torch.logsumexp(x, dim)
        assert ours.shape == theirs.shape and ours.dtype == dtype
        tol = 1e-6 if dtype == torch.float32 else 1e-12
        assert torch.allclose(ours, theirs, rtol=tol, atol=tol * spread)
        g_ours, = torch.autograd.grad(ours.sum(), x)
        g_theirs, = torch.autograd.grad(theirs.sum(), x)
        # x - max carries float rounding of about eps * |x| in both, so the softmax agrees to that
        assert torch.allclose(g_ours, g_theirs, rtol=1e-5, atol=max(1e-6, tol * spread))


def test_dropped_terms_count_for_nothing():
    """Terms exp(-50) (below the cut, half float32's exponent range: 43.7 nats), exp(-100) (a subnormal) and
    exp(-1e4) next to exp(0): dropping them changes nothing a float32 sum can hold."""
    x = torch.tensor([[0.0, -50.0, -100.0, -1e4], [-3.0, -3.0, -50.0, -200.0]])
    assert torch.equal(logsumexp(x, -1), torch.tensor([0.0, -3.0 + math.log(2.0)]))
    assert torch.equal(logsumexp(x, -1), torch.logsumexp(x, -1))


def test_special_values_as_torch():
    inf, nan = math.inf, math.nan
    rows = torch.tensor([[-inf, -inf, -inf], [inf, 1.0, 2.0], [-inf, 1.0, 2.0], [nan, 1.0, 2.0], [inf, -inf, 0.0]])
    ours, theirs = logsumexp(rows, -1), torch.logsumexp(rows, -1)
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(ours[~ours.isnan()], theirs[~theirs.isnan()])
    assert ours[3].isnan()  # a NaN is never summed away


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_dropped_terms_gradient_is_zero(dtype):
    """The terms dropped (more than log(tiny) / 2 below the largest) get gradient 0, not a number between
    the smallest normal one and its square root (whose products in the backward pass are subnormal numbers);
    the others get torch.logsumexp's. Incoming gradients of 1 and 1e-3 (a KL weight)."""
    low = math.log(torch.finfo(dtype).tiny) / 2
    x = (400.0 * torch.randn(100, 500, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).to(dtype)
    x.requires_grad_()
    dropped = (x - x.amax(-1, keepdim=True)) < low
    assert dropped.float().mean() > 0.5  # most of them, as in a mixture far from z
    for scale in (1.0, 1e-3):
        ours, = torch.autograd.grad(logsumexp(x, -1).sum() * scale, x)
        theirs, = torch.autograd.grad(torch.logsumexp(x, -1).sum() * scale, x)
        assert (ours[dropped] == 0).all()
        # x - max carries float rounding of about eps * |x| (|x| ~ 1000 here) in both, so the weights agree to that
        assert torch.allclose(ours[~dropped], theirs[~dropped], rtol=2e-4, atol=1e-6 * scale)
