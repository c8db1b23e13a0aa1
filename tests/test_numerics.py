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


def test_terms_below_the_smallest_normal_number_count_for_nothing():
    """A term exp(-100) next to exp(0) is a subnormal in float32: raising it to exp(-86.3) changes nothing."""
    x = torch.tensor([[0.0, -100.0, -1e4], [-3.0, -3.0, -200.0]])
    assert torch.equal(logsumexp(x, -1), torch.tensor([0.0, -3.0 + math.log(2.0)]))


def test_special_values_as_torch():
    inf, nan = math.inf, math.nan
    rows = torch.tensor([[-inf, -inf, -inf], [inf, 1.0, 2.0], [-inf, 1.0, 2.0], [nan, 1.0, 2.0], [inf, -inf, 0.0]])
    ours, theirs = logsumexp(rows, -1), torch.logsumexp(rows, -1)
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(ours[~ours.isnan()], theirs[~theirs.isnan()])
    assert ours[3].isnan()  # a NaN is never summed away
