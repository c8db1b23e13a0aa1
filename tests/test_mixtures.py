"""Mixture priors at the cost of their arithmetic: the matrix-product density against Pyro's
MixtureSameFamily, values and gradients; the VampPrior and the mixture of Gaussians use it."""

import math

import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_vae import build_vae
from pyro_vae.models.mixtures import DiagonalNormalMixture, MixtureOfGaussians, VampPrior

from conftest import tiny_config


def _random_mixture(k, d, seed, dtype=torch.float64, min_scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(k, generator=gen, dtype=dtype).requires_grad_()
    loc = (2 * torch.randn(k, d, generator=gen, dtype=dtype)).requires_grad_()
    scale = (min_scale + torch.rand(k, d, generator=gen, dtype=dtype) * 2).requires_grad_()
    return logits, loc, scale


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 60), d=st.integers(1, 12), batch=st.sampled_from([(), (5,), (3, 4)]), seed=st.integers(0, 99))
def test_fast_mixture_density_and_gradients_equal_mixture_same_family(k, d, batch, seed):
    logits, loc, scale = _random_mixture(k, d, seed)
    z = (3 * torch.randn(*batch, d, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
         ).requires_grad_()
    fast = DiagonalNormalMixture(logits, loc, scale)
    slow = fast.as_mixture_same_family()
    lp_fast, lp_slow = fast.log_prob(z), slow.log_prob(z)
    assert lp_fast.shape == lp_slow.shape == batch
    assert torch.allclose(lp_fast, lp_slow, atol=1e-5, rtol=0)
    grads_fast = torch.autograd.grad(lp_fast.sum(), (z, logits, loc, scale))
    grads_slow = torch.autograd.grad(lp_slow.sum(), (z, logits, loc, scale))
    for a, b in zip(grads_fast, grads_slow):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    log_scale = scale.detach().log().requires_grad_()  # the learned mixture's parameterisation
    lp_log = DiagonalNormalMixture(logits, loc, log_scale=log_scale).log_prob(z)
    assert torch.allclose(lp_log, lp_slow, atol=1e-5, rtol=0)
    g_log, = torch.autograd.grad(lp_log.sum(), log_scale)
    assert torch.allclose(g_log, grads_slow[3] * scale.detach(), atol=1e-5, rtol=1e-5)  # d/dlog s = s d/ds


def test_float32_error_stays_within_its_documented_bound():
    """In float32 the expansion costs precision where components are narrow: at |z| <= 4 and scales
    >= 0.05 (the bounded-logvar guide's floor) about 2e-3 nats at most, as the docstring says."""
    logits, loc, scale = (t.detach() for t in _random_mixture(500, 40, 0))
    z = (torch.rand(2000, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 8 - 4)
    z[:500] = loc[:500] + 0.1 * torch.randn(500, 40, dtype=torch.float64,  # right on top of components too
                                            generator=torch.Generator().manual_seed(2))
    z = z.clamp(-4, 4)
    reference = DiagonalNormalMixture(logits, loc, scale).log_prob(z)
    fast32 = DiagonalNormalMixture(logits.float(), loc.float(), scale.float()).log_prob(z.float())
    assert fast32.dtype == torch.float32
    assert (fast32.double() - reference).abs().max() < 3e-3
    fast64 = DiagonalNormalMixture(logits.float(), loc.float(), scale.float(), compute_dtype=torch.float64)
    assert (fast64.log_prob(z.float()).double() - reference).abs().max() < 1e-4


def test_sampling_mean_and_variance_follow_the_mixture():
    logits, loc, scale = (t.detach() for t in _random_mixture(3, 2, 4))
    mix = DiagonalNormalMixture(logits, loc, scale)
    slow = mix.as_mixture_same_family()
    torch.manual_seed(0)
    z = mix.sample((40_000,))
    assert z.shape == (40_000, 2)
    assert torch.allclose(mix.mean, slow.mean) and torch.allclose(mix.variance, slow.variance)
    assert torch.allclose(z.mean(0), slow.mean, atol=0.05) and torch.allclose(z.var(0), slow.variance, rtol=0.05)
    # the log-density integrates to 1 in 1-D
    one = DiagonalNormalMixture(*(t.detach() for t in _random_mixture(4, 1, 5)))
    grid = torch.linspace(-15, 15, 30001, dtype=torch.float64)[:, None]
    assert torch.trapezoid(one.log_prob(grid).exp(), grid[:, 0]).item() == pytest.approx(1.0, abs=1e-6)


def test_the_mixture_priors_use_the_fast_density():
    mog = MixtureOfGaussians(4, components=7)
    assert isinstance(mog(), DiagonalNormalMixture)
    z = torch.randn(10, 4)
    assert torch.allclose(mog().log_prob(z), mog().as_mixture_same_family().log_prob(z), atol=1e-5)
    vae = build_vae(tiny_config(prior="vamp", prior_components=6, latent_dim=3), 64, (8, 8), False)
    prior = vae.prior()
    assert isinstance(prior, DiagonalNormalMixture) and prior.num_components == 6
    q = vae.guide_dist(vae.prior.pseudo_inputs)
    slow = dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(6)), q)
    assert torch.allclose(prior.log_prob(z[:, :3]), slow.log_prob(z[:, :3]), atol=1e-5)
    # a guide that is not a diagonal Normal keeps the general mixture
    full = build_vae(tiny_config(prior="vamp", prior_components=6, latent_dim=3, guide="full-covariance"), 64,
                     (8, 8), False)
    assert isinstance(full.prior(), dist.MixtureSameFamily)


def test_pseudo_inputs_start_as_the_paper_or_as_training_images(digits):
    prior = VampPrior(3, 64, components=20)
    u = prior.pseudo_inputs
    assert u.mean().item() == pytest.approx(0.05, abs=0.002) and u.std().item() == pytest.approx(0.01, abs=0.002)
    prior.initialise_from_data(digits.train, seed=3)
    u = prior.pseudo_inputs.detach()
    distance = torch.cdist(u, digits.train).min(1).values  # each pseudo-input is one training image + noise
    assert (distance < 0.01 * math.sqrt(64) * 2).all()
    again = VampPrior(3, 64, components=20)
    again.initialise_from_data(digits.train, seed=3)
    assert torch.equal(again.raw_pseudo_inputs, prior.raw_pseudo_inputs)
    with pytest.raises(Exception, match="at least 20 training images"):
        again.initialise_from_data(digits.train[:5], seed=0)


def _slow_log_prob(z, logits, loc, log_scale):
    return dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(loc, log_scale.exp()).to_event(1)
                                  ).log_prob(z)


@pytest.mark.parametrize("far", [0, 27])
def test_the_backward_pass_touches_only_the_components_in_use(far, monkeypatch):
    """Components more than 43.7 nats below the best one for every z (logsumexp drops them) have responsibility
    0: the backward pass computes the gradients of the others only (``used``), and theirs are exactly 0 but for
    the logits' (-softmax * the total); with every component in use it takes the dense path. Both against Pyro's
    MixtureSameFamily, values and gradients."""
    import pyro_vae.models.mixtures as mixtures

    seen = []
    backward = mixtures._quadratic_backward
    monkeypatch.setattr(mixtures, "_quadratic_backward", lambda *a, used=None: seen.append(used) or backward(*a, used=used))
    gen = torch.Generator().manual_seed(far)
    logits = torch.randn(30, generator=gen, dtype=torch.float64).requires_grad_()
    loc = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    loc[:far] += 1000.0  # far from every z
    loc.requires_grad_()
    log_scale = (0.3 * torch.randn(30, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    z = torch.randn(12, 5, generator=gen, dtype=torch.float64).requires_grad_()
    fast = mixtures.mixture_log_prob(z, logits, loc, log_scale)
    slow = _slow_log_prob(z, logits, loc, log_scale)
    assert torch.allclose(fast, slow, atol=1e-9, rtol=0)
    ours = torch.autograd.grad(fast.sum(), (z, logits, loc, log_scale))
    theirs = torch.autograd.grad(slow.sum(), (z, logits, loc, log_scale))
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9)
    used = seen[-1]
    if far:
        assert used is not None and set(used.tolist()) <= set(range(far, 30))
        assert (ours[2][:far] == 0).all() and (ours[3][:far] == 0).all()
        weights = torch.softmax(logits.detach(), -1)
        assert torch.allclose(ours[1][:far], -weights[:far] * z.shape[0])  # sum of the incoming gradient: 12
    else:
        assert used is None


def test_float32_gradients_follow_the_double_precision_ones():
    """Training runs in float32: its gradients against MixtureSameFamily's in float64 (the expansion's rounding
    shows in the values, about 1e-5 nats here, and as much in the gradients)."""
    gen = torch.Generator().manual_seed(3)
    logits, loc = torch.randn(200, generator=gen, dtype=torch.float64), torch.randn(200, 16, generator=gen,
                                                                                   dtype=torch.float64)
    log_scale = -0.5 + 0.3 * torch.randn(200, 16, generator=gen, dtype=torch.float64)
    z = 1.5 * torch.randn(64, 16, generator=gen, dtype=torch.float64)
    args64 = [t.clone().requires_grad_() for t in (z, logits, loc, log_scale)]
    args32 = [t.float().requires_grad_() for t in (z, logits, loc, log_scale)]
    slow = _slow_log_prob(*args64)
    fast = DiagonalNormalMixture(args32[1], args32[2], log_scale=args32[3]).log_prob(args32[0])
    assert fast.dtype == torch.float32 and (fast.double() - slow).abs().max() < 1e-4
    for a, b in zip(torch.autograd.grad(fast.sum(), args32), torch.autograd.grad(slow.sum(), args64)):
        assert torch.allclose(a.double(), b, atol=1e-3, rtol=1e-3)


def test_the_plain_form_and_the_component_densities_agree_with_the_fused_one():
    """The forms the other paths use: the plain one (under torch.compile) followed by logsumexp, and the K
    component log-densities (``component_log_prob``, log w_k + log N(z; mu_k, s_k)), against the fused
    log-density and against Normal's own, values and gradients."""
    from pyro_vae.models.mixtures import _quadratic_forms, mixture_log_prob
    from pyro_vae.numerics import logsumexp

    logits, loc, scale = _random_mixture(20, 4, 7)
    log_scale = scale.detach().log().requires_grad_()
    z = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64).requires_grad_()
    fused = mixture_log_prob(z, logits, loc, log_scale)
    plain = logsumexp(_quadratic_forms(z.reshape(-1, 4), logits, loc, log_scale), -1).reshape(2, 6)
    mix = DiagonalNormalMixture(logits, loc, log_scale=log_scale)
    components = mix.component_log_prob(z)
    by_normal = torch.log_softmax(logits, -1) + dist.Normal(loc, log_scale.exp()).log_prob(z[..., None, :]).sum(-1)
    assert components.shape == (2, 6, 20)
    assert torch.allclose(plain, fused, atol=1e-10) and torch.allclose(components, by_normal, atol=1e-10)
    params = (z, logits, loc, log_scale)
    reference = torch.autograd.grad(by_normal.sum(), params)
    for out, compare in ((components.sum(), reference), (plain.sum(), torch.autograd.grad(fused.sum(), params))):
        for a, b in zip(torch.autograd.grad(out, params), compare):
            assert torch.allclose(a, b, atol=1e-9, rtol=1e-9)


def test_a_second_derivative_and_a_wrong_shape_are_refused():
    """The hand-written backward passes are first-order: create_graph=True raises rather than handing back a
    gradient that is silently constant; a value whose size is not the components' is refused by name."""
    from pyro_vae.models.mixtures import mixture_log_prob
    from pyro_vae.numerics import logsumexp

    logits, loc, scale = _random_mixture(5, 3, 1)
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    for out in (mixture_log_prob(z, logits, loc, scale.log()), logsumexp(z, -1),
                DiagonalNormalMixture(logits, loc, scale).component_log_prob(z)):
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.autograd.grad(out.sum(), z, create_graph=True)
    with pytest.raises(ValueError, match=r"no density at a value of shape \(4, 2\)"):
        mixture_log_prob(z[:, :2], logits, loc, scale.log())
