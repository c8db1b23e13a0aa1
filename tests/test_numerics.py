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


def test_the_terms_are_the_softmax_and_computed_in_place_on_request():
    """logsumexp_terms, the forward pass the mixture density builds on: (logsumexp, terms, total) with
    terms / total the softmax (its dropped entries exactly 0), the same whether or not it writes into x."""
    from pyro_vae.numerics import logsumexp_terms

    x = 30.0 * torch.randn(50, 40, generator=torch.Generator().manual_seed(2))
    out, terms, total = logsumexp_terms(x, -1)
    assert torch.allclose(out, torch.logsumexp(x, -1), atol=1e-5)
    dropped = (x - x.amax(-1, keepdim=True)) < math.log(torch.finfo(x.dtype).tiny) / 2
    assert dropped.any() and (terms[dropped] == 0).all()
    assert torch.allclose((terms / total)[~dropped], torch.softmax(x, -1)[~dropped], atol=1e-6)
    y = x.clone()
    again = logsumexp_terms(y, -1, inplace=True)
    assert all(torch.equal(a, b) for a, b in zip(again, (out, terms, total))) and y.data_ptr() == again[1].data_ptr()
    # float16's exponent range is too short for the cut (half of it is 4.9 nats): summed in float32
    h = torch.tensor([[0.0, -6.0, -6.0, -6.0, -6.0, -6.0, -6.0, -6.0]], dtype=torch.float16)
    assert logsumexp(h, -1).dtype == torch.float16
    assert logsumexp(h, -1).float().item() == pytest.approx(math.log(1 + 7 * math.exp(-6.0)), abs=1e-3)


def test_terms_above_the_cut_count():
    """A term 10 or 40 nats below the largest (above the cut, 43.7 nats in float32) still counts: a cut placed
    too high would drop what float32 can hold."""
    x = torch.tensor([[0.0, -10.0], [0.0, -40.0], [-5.0, -45.0]], dtype=torch.float64, requires_grad=True)
    ours = logsumexp(x.detach().float(), -1).double()
    assert ours[0].item() == pytest.approx(math.log1p(math.exp(-10.0)), rel=1e-2)  # (1 + 4.5e-5 in float32)
    assert torch.equal(logsumexp(x, -1), torch.logsumexp(x, -1))
    g, = torch.autograd.grad(logsumexp(x, -1).sum(), x)
    assert g[1, 1].item() == pytest.approx(math.exp(-40.0), rel=1e-9)
