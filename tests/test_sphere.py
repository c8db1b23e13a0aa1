"""Hyperspherical latents: the power spherical and von Mises-Fisher distributions, their priors and the
power spherical guide at any d, NUTS on the sphere, and every metric on sphere latents."""

import math

import numpy as np
import pytest
import pyro.distributions as dist
import torch
from scipy import integrate, stats
from torch import nn

from pyro_vae import PyroVAEError, build_vae, train
from pyro_vae.inference.analysis import analyze
from pyro_vae.inference.evaluate import evaluate
from pyro_vae.models.guides import AmortizedGuide, PowerSphericalFamily
from pyro_vae.models.linear_gaussian import IdentityGaussian
from pyro_vae.models.priors import UniformSphere
from pyro_vae.models.sphere import PowerSpherical, UniformSphereDistribution, VonMisesFisher, log_sphere_area
from pyro_vae.models.vae import VAE

from conftest import tiny_config

FAMILIES = [PowerSpherical, VonMisesFisher]


def _unit(v):
    v = torch.as_tensor(v, dtype=torch.float64)
    return v / v.norm()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kappa", [0.3, 4.0, 40.0])
def test_densities_integrate_to_one_on_the_circle_and_the_sphere(family, kappa):
    circle = family(_unit([0.6, -0.8]), torch.tensor(kappa, dtype=torch.float64))
    total, _ = integrate.quad(lambda th: circle.log_prob(torch.tensor([math.cos(th), math.sin(th)],
                                                                        dtype=torch.float64)).exp().item(),
                              0, 2 * math.pi, points=[math.atan2(-0.8, 0.6) % (2 * math.pi)], limit=200)
    assert total == pytest.approx(1.0, abs=1e-6)
    sphere = family(_unit([1.0, 2.0, -2.0]), torch.tensor(kappa, dtype=torch.float64))
    theta = torch.linspace(0, math.pi, 801, dtype=torch.float64)
    phi = torch.linspace(0, 2 * math.pi, 801, dtype=torch.float64)
    t, p = torch.meshgrid(theta, phi, indexing="ij")
    z = torch.stack([t.sin() * p.cos(), t.sin() * p.sin(), t.cos()], -1)
    density = sphere.log_prob(z).exp() * t.sin()
    total = torch.trapezoid(torch.trapezoid(density, phi, dim=1), theta).item()
    assert total == pytest.approx(1.0, abs=2e-3 if kappa > 10 else 1e-4)


@pytest.mark.parametrize("d", [2, 3, 10, 40])
def test_power_spherical_samples_follow_the_law_of_mu_t_z(d):
    """(mu^T z + 1) / 2 ~ Beta((d - 1)/2 + kappa, (d - 1)/2), and the rest of z is uniform around mu."""
    torch.manual_seed(d)
    mu = _unit(torch.randn(d)).float()
    q = PowerSpherical(mu, torch.tensor(3.0))
    z = q.rsample((20_000,))
    assert torch.allclose(z.norm(dim=-1), torch.ones(20_000), atol=1e-5)
    t = (z @ mu).double().numpy()
    assert stats.kstest((t + 1) / 2, stats.beta((d - 1) / 2 + 3.0, (d - 1) / 2).cdf).pvalue > 1e-3
    assert torch.allclose(z.mean(0), q.mean, atol=0.03)


@pytest.mark.parametrize("d,kappa", [(3, 1.0), (5, 10.0), (40, 50.0)])
def test_von_mises_fisher_samples_follow_the_law_of_mu_t_z(d, kappa):
    """mu^T z has density proportional to exp(kappa t) (1 - t^2)^((d - 3)/2) on [-1, 1]."""
    torch.manual_seed(1)
    mu = _unit(torch.randn(d))
    q = VonMisesFisher(mu, torch.tensor(kappa, dtype=torch.float64))
    t = (q.sample((20_000,)) @ mu).numpy()

    def pdf(s):
        return np.exp(kappa * (s - 1)) * (1 - s * s) ** ((d - 3) / 2)

    norm = integrate.quad(pdf, -1, 1, limit=200)[0]
    grid = np.linspace(-1, 1, 4001)
    cdf = np.concatenate([[0], np.cumsum((pdf(grid[1:]) + pdf(grid[:-1])) / 2 * np.diff(grid))]) / norm
    assert stats.kstest(t, lambda s: np.interp(s, grid, cdf)).pvalue > 1e-3
    assert torch.allclose(q.mean, torch.as_tensor(t.mean()) * mu, atol=0.01)


@pytest.mark.parametrize("family", FAMILIES)
def test_kl_to_the_uniform_matches_monte_carlo(family):
    torch.manual_seed(0)
    q = family(_unit([1.0, 0.0, 2.0, -1.0, 0.5]), torch.tensor(6.0, dtype=torch.float64))
    u = UniformSphereDistribution(5)
    z = q.sample((100_000,))
    mc = (q.log_prob(z) - u.log_prob(z).double()).mean().item()
    assert torch.distributions.kl_divergence(q, u).item() == pytest.approx(mc, abs=0.02)


def test_reparameterised_gradients_match_finite_differences():
    """d/dkappa and d/dmu of E[f(z)], z ~ PS(mu, kappa), by autograd through rsample against central
    differences with common random numbers."""
    a = _unit([0.3, -1.0, 0.5, 2.0])

    def expectation(mu, kappa, seed=0):
        torch.manual_seed(seed)
        z = PowerSpherical(mu / mu.norm(), kappa).rsample((200_000,))
        return (z @ a).pow(2).mean() + z[..., 0].mean()

    mu = _unit([1.0, 1.0, 0.0, 0.0]).requires_grad_()
    kappa = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    grad_mu, grad_kappa = torch.autograd.grad(expectation(mu, kappa), (mu, kappa))
    h = 1e-4
    with torch.no_grad():
        fd_kappa = (expectation(mu, kappa + h) - expectation(mu, kappa - h)) / (2 * h)
        e = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
        fd_mu = (expectation(mu + h * e, kappa) - expectation(mu - h * e, kappa)) / (2 * h)
    assert grad_kappa.item() == pytest.approx(fd_kappa.item(), rel=0.05, abs=2e-3)
    assert grad_mu[2].item() == pytest.approx(fd_mu.item(), rel=0.05, abs=2e-3)


def test_the_package_of_the_authors_agrees():
    power_spherical = pytest.importorskip("power_spherical")
    mu, kappa = _unit([0.2, -0.4, 1.0]).float(), torch.tensor([0.5, 7.0])
    ours = PowerSpherical(mu, kappa)
    theirs = power_spherical.PowerSpherical(mu.expand(2, 3), kappa)
    z = ours.rsample((11,))
    assert torch.allclose(ours.log_prob(z), theirs.log_prob(z), atol=1e-4)
    assert torch.allclose(ours.entropy(), theirs.entropy(), atol=1e-4)


def test_a_draw_with_a_tiny_normal_vector_stays_on_the_sphere(monkeypatch):
    """The uniform direction orthogonal to mu comes from a normal vector normalised; one of norm below 1e-7
    (at d = 2, about 1 draw in 10^7: it failed a trained S-VAE's K = 1000 evaluation with |z| = 0.9961) still
    gives a unit direction, so z stays on the sphere."""
    from pyro.distributions import constraints

    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **kw: 1e-9 * real_randn(*a, **kw))
    loc = torch.tensor([[0.9999, 0.0141], [0.0, 1.0]])
    z = PowerSpherical(loc / loc.norm(dim=-1, keepdim=True), torch.tensor([1146.8, 3.0])).rsample(torch.Size([100]))
    assert constraints.sphere.check(z).all()


def test_batched_parameters_broadcast():
    d = 6
    mu = torch.nn.functional.normalize(torch.randn(3, 1, d), dim=-1)
    kappa = torch.tensor([0.5, 1.0, 2.0, 4.0])
    for family in FAMILIES:
        q = family(mu, kappa)
        assert q.batch_shape == (3, 4) and q.event_shape == (d,)
        z = q.sample((5,))
        assert z.shape == (5, 3, 4, d) and q.log_prob(z).shape == (5, 3, 4)
        assert q.expand((2, 3, 4)).log_prob(z[:, None]).shape == (5, 2, 3, 4)


def test_bad_parameters_are_clear_errors(digits, tmp_path):
    with pytest.raises(ValueError, match="concentration"):
        PowerSpherical(_unit([1.0, 0.0]), torch.tensor(-1.0), validate_args=True)
    with pytest.raises(ValueError, match="loc"):
        VonMisesFisher(torch.tensor([1.0, 1.0]), torch.tensor(1.0), validate_args=True)
    with pytest.raises(PyroVAEError, match="d >= 2"):
        PowerSpherical(torch.tensor([1.0]), torch.tensor(1.0))
    for overrides, words in ((dict(prior="power-spherical", latent_dim=1), "latent_dim >= 2"),
                             (dict(prior="vmf", prior_concentration=-2.0), "prior_concentration must be > 0"),
                             (dict(prior="sphere", latent_dim=6, guide="projected-normal"), "latent_dim 2, 3 or 4")):
        with pytest.raises(PyroVAEError, match=words):
            train(tiny_config(**overrides), tmp_path / "r", data=digits, progress=False)
        assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- NUTS on the sphere


def test_nuts_on_the_sphere_matches_the_exact_von_mises_fisher_posterior():
    """Uniform prior on S^2, x | z ~ N(z, I): log p(x | z) = x^T z + const on the sphere, so the posterior
    is vMF(x / |x|, |x|) and log p(x) is known in closed form."""
    d = 3
    vae = VAE(UniformSphere(d), AmortizedGuide(nn.Linear(d, d + 1), PowerSphericalFamily(d)), nn.Identity(),
              IdentityGaussian(1.0, d), d, (1, d)).double()
    x = torch.tensor([[2.0, 1.0, 0.5], [-0.5, 0.0, 1.0]], dtype=torch.float64)
    torch.manual_seed(0)
    analysis = analyze(vae, x, num_chains=2, num_draws=600, warmup=300, num_particles=4000, optimise=False,
                       progress=False)
    z = torch.as_tensor(analysis.idata.posterior["z"].sel(inference="nuts").values).reshape(-1, 2, d)
    assert torch.allclose(z.norm(dim=-1), torch.ones((), dtype=z.dtype), atol=1e-6)
    for n in range(2):
        kappa = x[n].norm()
        exact = VonMisesFisher(x[n] / kappa, kappa)
        t = (z[:, n] @ exact.loc).numpy()
        assert t.mean() == pytest.approx((exact.mean @ exact.loc).item(), abs=0.05)
        log_px = (-0.5 * d * math.log(2 * math.pi) - 0.5 * (kappa ** 2 + 1) - exact.log_normalizer()
                  - log_sphere_area(d)).item()
        assert analysis.gaps["per_obs"][n]["log_px"] == pytest.approx(log_px, abs=0.02)


# --------------------------------------------------------------------------- sphere latents through the toolkit


@pytest.mark.parametrize("prior,objective", [("sphere", "analytic"), ("power-spherical", "trace"),
                                             ("vmf", "trace")])
def test_sphere_latents_train_and_evaluate_at_any_d(prior, objective, digits, tmp_path):
    run = train(tiny_config(prior=prior, latent_dim=7, objective=objective, epochs=3), tmp_path / "r", data=digits,
                progress=False)
    assert type(run.vae.guide_dist.family).__name__ == "PowerSphericalFamily"
    assert run.history[-1]["valid_elbo"] > run.history[0]["valid_elbo"]
    metrics = evaluate(run, num_particles=20, num_samples=50, progress=False)
    assert math.isfinite(metrics["log_likelihood"][0]) and metrics["rate_closed_form"] == (prior == "sphere")
    assert all(math.isfinite(v[0]) for v in metrics["aggregate_posterior"].values() if isinstance(v, list))
    for name in ("latent_space", "samples", "reconstructions"):
        assert (run.figures / f"{name}.png").is_file()


def test_the_sphere_guides_concentration_stays_above_one():
    """kappa = 1 + softplus(h): the S-VAE authors' floor against posterior collapse (with a floor of 1e-3 the
    S-VAE at d = 5 on binarized MNIST put every kappa at 1e-3 within an epoch and its decoder ignored z)."""
    family = PowerSphericalFamily(5)
    h = torch.cat([torch.randn(4, 5), torch.tensor([[-80.0], [-5.0], [0.0], [3.0]])], -1)
    kappa = family(h).concentration
    assert (kappa >= 1).all() and kappa[0].item() == 1.0
    assert kappa[2].item() == pytest.approx(1 + math.log(2))


def test_the_projected_normal_guide_stays_an_option(digits):
    vae = build_vae(tiny_config(prior="sphere", latent_dim=3, guide="projected-normal"), digits.dim,
                    digits.image_shape, digits.binary)
    assert type(vae.guide_dist.family).__name__ == "ProjectedNormalFamily"


@pytest.mark.parametrize("family", ["power-spherical", "vmf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_draws_lie_on_the_sphere_in_either_dtype(family, dtype):
    """Pyro's sphere support check at the dtype's own precision: float64 draws near the poles (large kappa)
    used to fail it, so log_prob of the distribution's own samples raised under validation."""
    from pyro_vae.models.sphere import PowerSpherical, VonMisesFisher

    torch.manual_seed(0)
    make = PowerSpherical if family == "power-spherical" else VonMisesFisher
    for d in (3, 10):
        loc = torch.nn.functional.normalize(torch.randn(d, dtype=dtype), dim=0)
        for kappa in (1.0, 1e3, 1e6):
            q = make(loc, torch.tensor(kappa, dtype=dtype), validate_args=True)
            z = q.sample((3000,))
            assert z.dtype == dtype and bool(dist.constraints.sphere.check(z).all()), (d, kappa)
            assert torch.isfinite(q.log_prob(z)).all()


def test_the_uniform_sphere_follows_its_dtype_and_validates():
    u = UniformSphereDistribution(3, validate_args=True, dtype=torch.float64)
    z = u.sample((5,))
    assert z.dtype == torch.float64 and u.entropy().dtype == torch.float64
    assert u.log_prob(z).dtype == torch.float64
    assert UniformSphereDistribution(3).log_prob(z).dtype == torch.float64  # the value's dtype
    for bad in (torch.tensor([2.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0, 0.0])):
        with pytest.raises(ValueError):
            u.log_prob(bad)
    assert torch.allclose(u.log_prob(torch.tensor([0.0, 1.0, 0.0])), torch.tensor(-math.log(4 * math.pi)))


def test_power_spherical_variance_and_shapes_as_pyro_expects():
    torch.manual_seed(0)
    loc = torch.nn.functional.normalize(torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.0, 0.0, 1.0, 0.0]]), dim=-1)
    q = PowerSpherical(loc, torch.tensor([3.0, 0.5]))
    z = q.sample((200_000,))
    assert torch.allclose(z.var(0), q.variance, atol=4e-3)
    assert torch.allclose(z.mean(0), q.mean, atol=4e-3)
    for family in (PowerSpherical, VonMisesFisher):
        assert family.infer_shapes(loc=(5, 3), concentration=(5,)) == (torch.Size([5]), torch.Size([3]))
        assert family.infer_shapes(loc=(3,), concentration=(2, 1)) == (torch.Size([2, 1]), torch.Size([3]))


@pytest.mark.parametrize("d", [2, 3, 10, 100, 200, 500, 1000, 2000, 5000])
def test_von_mises_fisher_normaliser_against_arbitrary_precision(d):
    """log C_d(kappa) = (d/2 - 1) log kappa - (d/2) log 2 pi - log I_{d/2-1}(kappa) to 1e-6 nats in float64, against
    mpmath at 40 digits, over kappa from 1e-4 to 1e6 (the small-argument fallback where scipy's ive underflows
    was 5 nats off at d = 1000, kappa = 100)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    v = d / 2 - 1
    mu = torch.zeros(d, dtype=torch.float64)
    mu[0] = 1
    for kappa in (1e-4, 1e-2, 1.0, 10.0, 100.0, 300.0, 1e3, 1e4, 1e6):
        ref = float(v * mpmath.log(kappa) - (d / 2) * mpmath.log(2 * mpmath.pi) - mpmath.log(mpmath.besseli(v, kappa)))
        got = VonMisesFisher(mu, torch.tensor(kappa, dtype=torch.float64)).log_normalizer().item()
        assert abs(got - ref) < 1e-6 * max(1.0, abs(ref) * 1e-6), (d, kappa, got, ref)


@pytest.mark.parametrize("d,kappa", [(3, 1e4), (10, 1e4), (100, 1e3), (1000, 1e-3), (1000, 100.0)])
def test_sphere_entropies_in_float32_agree_with_float64(d, kappa):
    for family in (VonMisesFisher, PowerSpherical):
        mu = torch.zeros(d, dtype=torch.float64)
        mu[0] = 1
        h64 = family(mu, torch.tensor(kappa, dtype=torch.float64)).entropy()
        h32 = family(mu.float(), torch.tensor(kappa)).entropy()
        assert h32.dtype == torch.float32 and abs(h32.item() - h64.item()) < 1e-3 * max(1.0, abs(h64.item()) * 1e-4)
        kl32 = torch.distributions.kl_divergence(family(mu.float(), torch.tensor(kappa)), UniformSphereDistribution(d))
        kl64 = log_sphere_area(d) - h64.item()
        assert kl32.dtype == torch.float32 and kl32.item() >= 0 and abs(kl32.item() - kl64) < 1e-3 * max(1.0, kl64 * 1e-4)


@pytest.mark.parametrize("d", [2, 10, 1000, 5000])
def test_power_spherical_normaliser_against_arbitrary_precision(d):
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    mu = torch.zeros(d, dtype=torch.float64)
    mu[0] = 1
    for kappa in (1e-4, 1.0, 100.0, 1e4, 1e6):
        a, b = mpmath.mpf(d - 1) / 2 + kappa, mpmath.mpf(d - 1) / 2
        ref = float(-((a + b) * mpmath.log(2) + b * mpmath.log(mpmath.pi) + mpmath.loggamma(a) - mpmath.loggamma(a + b)))
        got = PowerSpherical(mu, torch.tensor(kappa, dtype=torch.float64)).log_normalizer().item()
        assert abs(got - ref) < 1e-6 * max(1.0, abs(ref) * 1e-6), (d, kappa, got, ref)
