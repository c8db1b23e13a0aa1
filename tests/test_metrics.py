"""The estimators: honest on a model whose answers are known, consistent with each other, reproducible."""

import json

import pytest
import torch

from pyro_vae import train
from pyro_vae.cli import main
from pyro_vae.inference.evaluate import evaluate
from pyro_vae.inference.metrics import (aggregate_posterior, elbo_per_datapoint, gradient_energy,
                                        iw_log_likelihood, mean_and_stderr, rate_and_distortion, sharpness_ratio)
from pyro_vae.inference.sample_quality import frechet_distance

from conftest import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    return train(tiny_config(epochs=5, latent_dim=4), tmp_path_factory.mktemp("m") / "run", data=digits,
                 progress=False)


def test_importance_weighted_bound_is_above_the_elbo_and_rises_with_k(trained, digits):
    vae, x = trained.vae, digits.test[:60]
    torch.manual_seed(0)
    elbo = elbo_per_datapoint(vae, x, num_particles=50).mean().item()
    bounds = []
    for k in (1, 10, 100, 1000):
        torch.manual_seed(1)
        bounds.append(iw_log_likelihood(vae, x, num_particles=k).mean().item())
    assert bounds[0] == pytest.approx(elbo, abs=1.0)  # K = 1 is the ELBO itself
    assert all(b > a for a, b in zip(bounds, bounds[1:]))
    assert bounds[-1] > elbo


def test_rate_closed_form_agrees_with_monte_carlo(trained, digits):
    vae, x = trained.vae, digits.test[:100]
    torch.manual_seed(0)
    closed = rate_and_distortion(vae, x)
    assert closed["rate_closed_form"]
    q, p = vae.guide_dist(x), vae.prior()
    z = q.sample((2000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    assert torch.allclose(closed["rate"], mc, atol=0.15)
    # ELBO = -distortion - rate
    torch.manual_seed(0)
    elbo = elbo_per_datapoint(vae, x, num_particles=500).mean().item()
    assert elbo == pytest.approx(-closed["distortion"].mean().item() - closed["rate"].mean().item(), abs=0.3)


def test_elbo_surgery_adds_up(trained, digits):
    vae, x = trained.vae, digits.test
    torch.manual_seed(0)
    agg = aggregate_posterior(vae, x)
    rate = rate_and_distortion(vae, x)["rate"]
    mi, kl = agg["mutual_information"][0], agg["marginal_kl"][0]
    assert 0 < mi <= agg["mutual_information_bound"]
    assert kl > -0.05
    rate_mean, rate_se = mean_and_stderr(rate)
    assert mi + kl == pytest.approx(rate_mean, abs=4 * (agg["rate_from_surgery"][1] + rate_se))
    assert 0 <= agg["hole_score"][0] <= 1


def test_hole_score_sees_a_prior_far_from_the_data(trained, digits):
    """Shift the prior away from where the encoder puts the data: nearly every prior draw is a hole."""
    vae = trained.vae
    torch.manual_seed(0)
    normal = aggregate_posterior(vae, digits.test)["hole_score"][0]
    with torch.no_grad():
        vae.prior.loc.add_(20.0)
    try:
        shifted = aggregate_posterior(vae, digits.test)["hole_score"][0]
    finally:
        with torch.no_grad():
            vae.prior.loc.sub_(20.0)
    assert shifted > 0.99 and normal < 0.5


def test_sharpness_and_frechet_basics():
    torch.manual_seed(0)
    sharp = torch.bernoulli(torch.full((50, 64), 0.5))
    blurred = torch.full((50, 64), 0.5)
    assert sharpness_ratio(sharp, sharp, (8, 8)) == pytest.approx(1.0)
    assert sharpness_ratio(blurred, sharp, (8, 8)) == 0.0
    assert gradient_energy(sharp, (8, 8)).shape == (50,)
    a = torch.randn(500, 3)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 2.0) == pytest.approx(12.0, abs=1e-6)


def test_evaluate_is_reproducible_and_writes_metrics(trained):
    first = evaluate(trained, num_particles=50, num_samples=200, progress=False)
    second = evaluate(trained, num_particles=50, num_samples=200, progress=False, save=False)
    for key in ("elbo", "log_likelihood", "rate", "distortion"):
        assert first[key] == second[key]
    assert first["aggregate_posterior"] == second["aggregate_posterior"]
    saved = json.loads((trained.path / "metrics.json").read_text())
    assert saved["log_likelihood"] == list(first["log_likelihood"])
    sq = saved["sample_quality"]
    assert sq["classifier_test_accuracy"] > 0.85
    assert sq["test_images"]["frechet_distance"] < sq["prior"]["frechet_distance"]
    assert (trained.path / "loglik_per_point.npy").is_file()


def test_evaluate_cli_prints_the_table(trained, capsys):
    assert main(["evaluate", str(trained.path), "--k", "20", "--n-test", "50", "--samples", "100", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "log p(x), K=20" in out and "prior-hole score" in out
    assert json.loads((trained.path / "metrics.json").read_text())["num_test_points"] == 50


def test_evaluate_bad_input(trained, tmp_path):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert main(["evaluate", str(trained.path), "--k", "0", "--quiet"]) == 2


# --------------------------------------------------------------------------- against closed forms


@pytest.fixture(scope="module")
def ppca():
    """Probabilistic PCA, D = 6, d = 2, with the mean-field-optimal linear encoder, and 2,000 data
    points drawn from the model itself. Its log p(x), rate and aggregate posterior are known exactly."""
    from pyro_vae.models.linear_gaussian import build_linear_gaussian_vae, set_optimal_encoder

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 2, generator=gen)
    b = torch.randn(6, generator=gen)
    vae = set_optimal_encoder(build_linear_gaussian_vae(6, 2, sigma=0.7, weight=w, bias=b))
    x = (torch.randn(2000, 2, generator=gen) @ w.T + b + 0.7 * torch.randn(2000, 6, generator=gen))
    return vae, x


def test_log_likelihood_estimator_matches_the_exact_evidence(ppca):
    from pyro_vae.models.linear_gaussian import exact_log_marginal

    vae, x = ppca
    torch.manual_seed(0)
    estimate = iw_log_likelihood(vae, x, num_particles=1000).double()
    exact = exact_log_marginal(vae, x)
    diff_mean, diff_se = mean_and_stderr(estimate - exact)
    assert abs(diff_mean) < 3 * diff_se + 1e-3
    mean, se = mean_and_stderr(estimate)
    assert abs(mean - exact.mean().item()) < se
    torch.manual_seed(0)
    elbo = elbo_per_datapoint(vae, x, num_particles=100).double()
    assert (exact - elbo).mean() > 3 * mean_and_stderr(exact - elbo)[1]  # the mean-field ELBO is strictly below


def test_rate_and_marginal_kl_match_their_closed_forms(ppca):
    from pyro_vae.models.linear_gaussian import linear_gaussian_parts, optimal_mean_field

    vae, x = ppca
    q = optimal_mean_field(vae, x)
    loc, var = q.base_dist.loc.double(), q.base_dist.scale.double() ** 2
    exact_rate = 0.5 * (var + loc ** 2 - 1 - var.log()).sum(-1)
    rd = rate_and_distortion(vae, x)
    assert torch.allclose(rd["rate"].double(), exact_rate, atol=1e-3)
    # population aggregate posterior: m(x) = G (x - b) with x ~ N(b, W W^T + Psi), so
    # q(z) = N(0, G C G^T + diag(var)), and KL(q(z) || N(0, I)) = (tr S - d - log det S) / 2
    w, b, psi = linear_gaussian_parts(vae)
    enc = vae.guide_dist.encoder
    gain = enc.weight[:2].double()
    cov = gain @ (w @ w.T + torch.diag(psi)) @ gain.T + torch.diag(var[0])
    exact_marginal_kl = 0.5 * (torch.trace(cov) - 2 - torch.logdet(cov)).item()
    torch.manual_seed(0)
    agg = aggregate_posterior(vae, x)
    kl, kl_se = agg["marginal_kl"]
    mi, mi_se = agg["mutual_information"]
    # the N-component estimate of log q(z) is biased by O(1/N) at N = 2000; allow 3 standard errors + 0.01
    assert abs(kl - exact_marginal_kl) < 3 * kl_se + 0.01
    assert abs(mi - (exact_rate.mean().item() - exact_marginal_kl)) < 3 * mi_se + 0.01
