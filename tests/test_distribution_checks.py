"""Pyro's generic distribution checks (tests/distributions/ of pyro-ppl), ported to every distribution this
project defines: shapes, expand, the support of samples, goodness of fit (Pyro's own
``auto_goodness_of_fit``), moments, reparameterised gradients, pickling and argument validation."""

import pickle

import pytest
import torch
from pyro.distributions.testing.gof import auto_goodness_of_fit

from pyro_vae.models.mixtures import DiagonalNormalMixture
from pyro_vae.models.sphere import PowerSpherical, UniformSphereDistribution, VonMisesFisher

GOF_THRESHOLD = 1e-3  # the goodness-of-fit p-value below which a sampler and its density disagree


def _unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


def _power_spherical(batch=(2,), validate=None):
    gen = torch.Generator().manual_seed(0)
    return PowerSpherical(_unit(torch.randn(*batch, 3, generator=gen)), torch.full(batch, 4.0), validate_args=validate)


def _vmf(batch=(2,), validate=None):
    gen = torch.Generator().manual_seed(1)
    return VonMisesFisher(_unit(torch.randn(*batch, 3, generator=gen)), torch.full(batch, 4.0), validate_args=validate)


def _uniform(batch=(2,), validate=None):
    return UniformSphereDistribution(3, batch_shape=torch.Size(batch), validate_args=validate)


def _mixture(batch=(), validate=None):
    gen = torch.Generator().manual_seed(2)
    return DiagonalNormalMixture(torch.randn(4, generator=gen), 2 * torch.randn(4, 2, generator=gen),
                                 0.3 + torch.rand(4, 2, generator=gen), validate_args=validate)


FAMILIES = {"power-spherical": (_power_spherical, 2), "vmf": (_vmf, 2), "uniform-sphere": (_uniform, 2),
            "diagonal-normal-mixture": (_mixture, 2)}
"""name -> (a factory of a batched instance, the support's dimension as a manifold)."""


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


def test_shapes_and_support(family):
    make, _ = FAMILIES[family]
    d = make()
    z = d.sample((5,))
    assert z.shape == (5,) + d.batch_shape + d.event_shape
    assert bool(d.support.check(z).all())
    assert d.log_prob(z).shape == (5,) + d.batch_shape
    assert torch.isfinite(d.log_prob(z)).all()


def test_expand(family):
    make, _ = FAMILIES[family]
    d = make()
    wide = d.expand(torch.Size([3]) + d.batch_shape)
    assert wide.batch_shape == (3,) + d.batch_shape and wide.event_shape == d.event_shape
    z = d.sample()
    assert torch.allclose(wide.log_prob(z), d.log_prob(z).expand(wide.batch_shape), atol=1e-5)
    assert wide.sample().shape == wide.batch_shape + wide.event_shape


def test_pickling_keeps_the_distribution(family):
    make, _ = FAMILIES[family]
    d = make()
    z = d.sample((4,))
    again = pickle.loads(pickle.dumps(d))
    assert torch.allclose(again.log_prob(z), d.log_prob(z))


def test_goodness_of_fit(family):
    """Samples and density agree (Pyro's nearest-neighbour test, on the support's own dimension)."""
    make, dim = FAMILIES[family]
    torch.manual_seed(3)
    d = make(batch=()) if family != "diagonal-normal-mixture" else make()
    z = d.sample((4000,))
    probs = d.log_prob(z).exp()
    assert auto_goodness_of_fit(z, probs, dim=dim) > GOF_THRESHOLD


def test_moments(family):
    make, _ = FAMILIES[family]
    torch.manual_seed(4)
    d = make()
    z = d.sample((100_000,))
    try:
        mean = d.mean
    except NotImplementedError:
        mean = None
    if mean is not None:
        assert torch.allclose(z.mean(0), mean, atol=0.02)
    try:
        variance = d.variance
    except NotImplementedError:
        variance = None
    if variance is not None:
        assert torch.allclose(z.var(0), variance, atol=0.02 * max(1.0, float(variance.max())))
    assert mean is not None or family == "uniform-sphere"


def test_reparameterised_gradients_are_finite(family):
    make, _ = FAMILIES[family]
    d = make()
    if not d.has_rsample or family == "uniform-sphere":
        pytest.skip("no parameters to differentiate, or not reparameterised")
    loc = d.loc.clone().requires_grad_(True)
    kappa = d.concentration.clone().requires_grad_(True)
    z = type(d)(_unit(loc), kappa).rsample((64,))
    (z * torch.arange(1.0, 4.0)).sum().backward()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(kappa.grad).all() and kappa.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", ["loc off the sphere", "negative concentration"])
@pytest.mark.parametrize("make", [PowerSpherical, VonMisesFisher])
def test_validation_refuses_bad_parameters(make, bad):
    loc, kappa = torch.tensor([1.0, 0.0, 0.0]), torch.tensor(2.0)
    if bad == "loc off the sphere":
        loc = torch.tensor([2.0, 0.0, 0.0])
    else:
        kappa = torch.tensor(-1.0)
    with pytest.raises(ValueError):
        make(loc, kappa, validate_args=True)


def test_validation_refuses_values_off_the_support(family):
    make, _ = FAMILIES[family]
    d = make(validate=True)
    if family == "diagonal-normal-mixture":
        bad = torch.full(d.event_shape, float("nan"))
    else:
        bad = torch.tensor([2.0, 0.0, 0.0])
    with pytest.raises(ValueError):
        d.log_prob(bad)
