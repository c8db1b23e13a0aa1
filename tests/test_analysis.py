"""Posterior analysis: NUTS against a posterior known in closed form, the InferenceData and its NetCDF
file, the gaps, priors NUTS can and cannot sample, and ``pyro-vae analyze`` on a trained run."""

import json
import math
import warnings

import numpy as np
import arviz as az
import pandas as pd
import pyro.distributions as dist
import pytest
import torch
import xarray as xr
from pyro.infer.autoguide.initialization import init_to_value
from pyro.infer.mcmc.util import initialize_model
from torch import nn

from pyro_vae import PyroVAEError, build_vae, train
from pyro_vae.cli import main
from pyro_vae.inference.analysis import (analyze, compute_gaps, load_inference_data, save_analysis,
                                         save_inference_data)
from pyro_vae.inference.mcmc import check_nuts_support, direct_potential, run_nuts
from pyro_vae.inference.pointwise import pointwise_guide
from pyro_vae.models.linear_gaussian import (build_linear_gaussian_vae, exact_log_marginal, exact_posterior,
                                             gaussian_elbo, mean_field_gap, optimal_mean_field,
                                             posterior_moments, set_optimal_encoder)
from pyro_vae.models.priors import FixedDistribution
from pyro_vae.models.vae import VAE

from conftest import tiny_config

CHAINS, DRAWS, WARMUP = 4, 300, 100


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Everything here is small tensors: one thread is faster, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def linear_gaussian(seed=0, data_dim=6, latent_dim=2, n_obs=3):
    """A linear-Gaussian VAE whose posterior is strongly correlated (the columns of W nearly align)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(data_dim, latent_dim, generator=gen)
    w[:, 1] = 0.8 * w[:, 0] + 0.4 * w[:, 1]
    vae = build_linear_gaussian_vae(data_dim, latent_dim, sigma=0.7, weight=w,
                                    bias=torch.randn(data_dim, generator=gen), image_shape=(2, 3)).eval()
    x = 2 * torch.randn(n_obs, data_dim, generator=gen)
    return vae, x


@pytest.fixture(scope="module")
def lg_analysis():
    torch.manual_seed(0)
    vae, x = linear_gaussian()
    analysis = analyze(vae, x, indices=[5, 9, 11], labels=[1, 2, 3], num_chains=CHAINS, num_draws=DRAWS,
                       warmup=WARMUP, dense_mass=True, num_particles=2000, ppc_draws=20, seed=0, progress=False)
    return vae, x, analysis


# --------------------------------------------------------------------------- the linear-Gaussian ground truth


@torch.no_grad()
def test_linear_gaussian_closed_forms_agree_with_brute_force():
    vae, x = linear_gaussian(seed=1, data_dim=4)
    # log p(x) by quadrature over z in 2-D
    grid = torch.linspace(-6, 6, 601, dtype=torch.float64)
    z = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    w, b = vae.decoder.weight.double(), vae.decoder.bias.double()
    for n in range(len(x)):
        log_joint = (dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
                     + dist.Normal(z @ w.T + b, 0.7).log_prob(x[n].double()).sum(-1))
        quadrature = torch.logsumexp(log_joint, 0) + 2 * math.log(grid[1] - grid[0])
        assert abs(quadrature - exact_log_marginal(vae, x[n : n + 1])[0]) < 1e-4
        post = torch.softmax(log_joint, 0)
        mean = post @ z
        cov = (z - mean).T @ ((z - mean) * post[:, None])
        m, s = posterior_moments(vae, x[n : n + 1])
        assert torch.allclose(mean, m[0], atol=1e-4) and torch.allclose(cov, s, atol=1e-4)
    # the best mean-field Gaussian: its KL to the posterior is the closed-form gap, and nudging it lowers the ELBO
    q = optimal_mean_field(vae, x)
    loc, scale = q.base_dist.loc, q.base_dist.scale
    best = gaussian_elbo(vae, x, loc, scale)
    assert torch.allclose(exact_log_marginal(vae, x) - best, torch.full((len(x),), mean_field_gap(vae),
                                                                         dtype=torch.float64), atol=1e-9)
    for delta in (torch.tensor([0.05, 0.0]), torch.tensor([0.0, -0.05])):
        assert (gaussian_elbo(vae, x, loc + delta, scale) < best).all()
        assert (gaussian_elbo(vae, x, loc, scale * torch.exp(delta)) < best).all()
    # set_optimal_encoder makes the amortized guide that optimum
    set_optimal_encoder(vae)
    amortized = vae.guide_dist(x)
    assert torch.allclose(amortized.base_dist.loc, loc, atol=1e-5)
    assert torch.allclose(amortized.base_dist.scale, scale, atol=1e-5)


def test_nuts_matches_the_exact_posterior_within_monte_carlo_error(lg_analysis):
    vae, x, analysis = lg_analysis
    z = analysis.idata.posterior["z"].sel(inference="nuts").values.astype(np.float64)  # chain, draw, obs, latent
    assert z.shape == (CHAINS, DRAWS, 3, 2)
    summary = analysis.summary
    assert summary["r_hat"].max() < 1.01
    assert analysis.nuts.num_divergences == 0
    mean, cov = (t.numpy() for t in posterior_moments(vae, x))
    for n, obs in enumerate([5, 9, 11]):
        # means: within 4 Monte Carlo standard errors sd / sqrt(ESS), ESS from ArviZ
        ess = summary.loc[obs, "ess_bulk"].to_numpy()
        assert (ess > 300).all()
        se = np.sqrt(cov.diagonal() / ess)
        assert (np.abs(z[:, :, n].mean((0, 1)) - mean[n]) < 4 * se).all(), (z[:, :, n].mean((0, 1)), mean[n], se)
        # covariances: S_ij = E[(z_i - m_i)(z_j - m_j)], within 4 standard errors of that product's mean
        centred = z[:, :, n] - mean[n]
        for i in range(2):
            for j in range(i + 1):
                product = centred[..., i] * centred[..., j]
                se = product.std() / np.sqrt(az.ess(product))
                assert abs(product.mean() - cov[i, j]) < 4 * se, (i, j, product.mean(), cov[i, j], se)
    # the posterior is strongly correlated, and NUTS sees it
    assert cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1]) < -0.5
    assert np.corrcoef(z[:, :, 0].reshape(-1, 2).T)[0, 1] < -0.5


def test_gaps_match_the_closed_forms(lg_analysis):
    vae, x, analysis = lg_analysis
    gaps = analysis.gaps
    rows = gaps["per_obs"]
    exact = exact_log_marginal(vae, x)
    q = vae.guide_dist(x)
    amortized = gaussian_elbo(vae, x, q.base_dist.loc, q.base_dist.scale)
    for n, row in enumerate(rows):
        assert row["obs"] == [5, 9, 11][n] and row["label"] == [1, 2, 3][n]
        assert abs(row["log_px"] - exact[n].item()) < 0.01 + 4 * row["log_px_stderr"]
        assert abs(row["elbo_amortized"] - amortized[n].item()) < 4 * row["elbo_amortized_stderr"] + 1e-3
        # the optimised guide is the mean-field optimum up to the sample-average approximation (< 0.02 nats)
        se = row["approximation_gap_stderr"]
        assert 0 < se < 0.05
        assert -4 * se < row["approximation_gap"] - mean_field_gap(vae) < 0.02 + 4 * se
        assert math.isclose(row["gap"], row["approximation_gap"] + row["amortization_gap"], abs_tol=1e-9)
        assert row["amortization_gap"] > 1.0  # the encoder is random: far from the per-point optimum
    assert "NUTS draws" in gaps["log_px_estimator"]


def test_amortization_gap_vanishes_for_the_optimal_encoder():
    vae, x = linear_gaussian()
    set_optimal_encoder(vae)
    fitted = pointwise_guide(vae, x, num_particles=256, progress=False)
    exact_draws = exact_posterior(vae, x).sample((2, 500))  # chain, draw, obs, latent
    gaps = compute_gaps(vae, fitted, x, indices=[0, 1, 2], num_particles=4000, nuts_z=exact_draws)
    for row in gaps["per_obs"]:
        # the per-point fit reaches the optimum up to the sample-average approximation (< 0.02 nats here);
        # both ELBOs use the same random numbers, so their difference is precise
        assert row["amortization_gap_stderr"] < 0.01
        se = row["amortization_gap_stderr"]
        assert -0.02 - 4 * se < row["amortization_gap"] < 4 * se, row  # the amortized guide is the optimum
        se = row["approximation_gap_stderr"]
        assert -4 * se < row["approximation_gap"] - mean_field_gap(vae) < 0.02 + 4 * se, row


# --------------------------------------------------------------------------- InferenceData and NetCDF


def test_inference_data_groups_dims_and_coords(lg_analysis):
    vae, x, analysis = lg_analysis
    idata = analysis.idata
    assert {"posterior", "prior", "posterior_predictive", "log_likelihood", "sample_stats", "observed_data",
            "constant_data"} <= set(idata.groups())
    z = idata.posterior["z"]
    assert z.dims == ("chain", "draw", "inference", "obs", "latent")
    assert list(z["inference"].values) == ["guide", "optimised", "nuts"]
    assert list(z["obs"].values) == [5, 9, 11] and list(z["latent"].values) == [0, 1]
    # the prior's draws, repeated under every (inference, obs) so that one coordinate selection serves prior
    # and posterior alike (az.plot_dist_comparison)
    assert idata.prior["z"].dims == ("chain", "draw", "inference", "obs", "latent")
    assert idata.prior["z"].shape == (1, CHAINS * DRAWS, 3, 3, 2)
    assert (idata.prior["z"] == idata.prior["z"].isel(inference=0, obs=0)).all()
    assert idata.observed_data["x"].dims == ("obs", "pixel")
    np.testing.assert_allclose(idata.observed_data["x"].values, x.numpy())
    assert list(idata.constant_data["label"].values) == [1, 2, 3]
    # log p(x | z) per observation, for every draw of every method
    ll = idata.log_likelihood["x"]
    assert ll.dims == ("chain", "draw", "inference", "obs") and ll.shape == (CHAINS, DRAWS, 3, 3)
    z_nuts = torch.as_tensor(z.sel(inference="nuts").values)
    expected = vae.likelihood(vae.decoder(z_nuts[1, 7])).log_prob(x)
    np.testing.assert_allclose(ll.sel(inference="nuts").values[1, 7], expected.detach().numpy(), rtol=1e-5)
    # the posterior predictive: a thinned set of draws, keeping their draw numbers
    pp = idata.posterior_predictive
    assert pp["x_mean"].dims == ("chain", "draw", "inference", "obs", "pixel")
    draw = int(pp["draw"].values[3])
    assert 0 < draw < DRAWS and len(pp["draw"]) == 20
    decoded = vae.decode(z_nuts[2, draw])
    np.testing.assert_allclose(pp["x_mean"].sel(inference="nuts", chain=2, draw=draw).values, decoded.numpy(),
                               rtol=1e-5, atol=1e-6)
    # NUTS sample stats
    stats = idata.sample_stats
    assert {"diverging", "step_size", "tree_depth", "n_steps", "acceptance_rate", "lp"} <= set(stats.data_vars)
    assert stats["diverging"].dtype == bool and stats["diverging"].shape == (CHAINS, DRAWS)
    assert (stats["step_size"] > 0).all() and (stats["tree_depth"] >= 1).all()
    assert (stats["n_steps"] <= 2 ** stats["tree_depth"]).all()
    assert ((stats["acceptance_rate"] >= 0) & (stats["acceptance_rate"] <= 1 + 1e-9)).all()
    # step size is fixed after warm-up, within a chain
    assert (stats["step_size"].std("draw") < 1e-12).all()
    # guide draws are draws of the guide
    q = vae.guide_dist(x)
    guide = torch.as_tensor(z.sel(inference="guide").values).reshape(-1, 3, 2)
    assert (guide.mean(0) - q.base_dist.loc).abs().max() < 5 * q.base_dist.scale.max() / math.sqrt(len(guide))


def test_arviz_functions_run_on_the_written_file(lg_analysis, tmp_path):
    """energy for az.bfmi and az.plot_energy; the prior's dims for az.plot_dist_comparison; az.loo and
    az.plot_ppc on one inference method, as the README says."""
    import matplotlib.pyplot as plt

    _, _, analysis = lg_analysis
    idata = load_inference_data(save_inference_data(analysis.idata, tmp_path / "idata.nc"))
    stats = idata.sample_stats
    # the Hamiltonian where a trajectory starts: the last draw's potential energy (-lp) plus a kinetic energy >= 0
    assert (stats["energy"].values[:, 1:] >= -stats["lp"].values[:, :-1] - 1e-6).all()
    bfmi = az.bfmi(idata)
    assert bfmi.shape == (CHAINS,) and (bfmi > 0.3).all()  # a well-mixed Gaussian posterior
    az.plot_energy(idata)
    az.plot_dist_comparison(idata, var_names=["z"], coords={"inference": ["nuts"], "obs": [9], "latent": [0]})
    nuts = idata.sel(inference="nuts")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # three images: ArviZ warns about the Pareto k estimates
        loo = az.loo(nuts, pointwise=True)
    assert loo.loo_i.shape == (3,) and np.isfinite(loo.elpd_loo)
    az.plot_ppc(nuts, num_pp_samples=10)
    plt.close("all")
    assert "not a model comparison" in analysis.report()


def test_netcdf_round_trip_is_identical(lg_analysis, tmp_path):
    _, _, analysis = lg_analysis
    path = save_inference_data(analysis.idata, tmp_path / "idata.nc")
    assert [p.name for p in tmp_path.iterdir()] == ["idata.nc"]  # no temporary file left behind
    loaded = load_inference_data(path)
    assert set(loaded.groups()) == set(analysis.idata.groups())
    for group in analysis.idata.groups():
        xr.testing.assert_identical(loaded[group], analysis.idata[group])
    for key, value in analysis.idata.attrs.items():
        assert np.array_equal(np.asarray(loaded.attrs[key]), np.asarray(value)), key


def test_summary_table_and_files(lg_analysis, tmp_path):
    _, _, analysis = lg_analysis
    table = analysis.summary
    assert list(table.index.names) == ["obs", "latent"] and len(table) == 6
    for column in ("mean", "sd", "ess_bulk", "ess_tail", "r_hat", "guide_mean", "guide_sd", "optimised_mean",
                   "optimised_sd", "guide_sd_ratio"):
        assert column in table
    post = analysis.idata.posterior["z"]
    np.testing.assert_allclose(table.loc[(9, 1), "mean"], post.sel(inference="nuts", obs=9, latent=1).mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(table.loc[(9, 1), "guide_sd"],
                               post.sel(inference="guide", obs=9, latent=1).std(ddof=1), rtol=1e-5)
    paths = save_analysis(analysis, tmp_path, figures=False)
    csv = pd.read_csv(paths["summary_csv"], index_col=[0, 1])
    np.testing.assert_allclose(csv["r_hat"].to_numpy(), table["r_hat"].to_numpy())
    assert json.loads(paths["gaps"].read_text())["per_obs"][0]["obs"] == 5
    text = paths["summary_txt"].read_text()
    assert "R-hat max" in text and "amortization" in text


# --------------------------------------------------------------------------- which priors NUTS can sample


def _digits_vae(prior=None, latent_dim=2):
    return build_vae(tiny_config(latent_dim=latent_dim), 64, (8, 8), False, prior=prior).eval()


def _pyro_potential(vae, x, transforms=None):
    """Pyro's own potential for vae.model conditioned on x, and its transform for z."""
    start = init_to_value(values={"z": vae.prior().sample((len(x),))})
    _, potential_fn, transforms, _ = initialize_model(vae.model, model_args=(x,), transforms=transforms,
                                                      init_strategy=start, max_plate_nesting=1)
    return potential_fn, transforms["z"]


def _mixture(latent_dim=2):
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])[:, :latent_dim]
    return dist.MixtureSameFamily(dist.Categorical(torch.ones(3)), dist.Normal(means, 0.7).to_event(1))


def _vae_with(prior, latent_dim):
    """A digits-sized VAE around any prior (its guide, never used by NUTS, from a Normal-prior VAE)."""
    base = _digits_vae(latent_dim=latent_dim)
    return VAE(FixedDistribution(prior), base.guide_dist, base.decoder, base.likelihood, latent_dim, (8, 8)).eval()


@pytest.mark.parametrize("prior", [
    dist.Laplace(torch.zeros(2), torch.ones(2)).to_event(1),
    dist.Dirichlet(torch.full((3,), 0.8)),
    dist.Gamma(torch.full((2,), 2.0), torch.ones(2)).to_event(1),
    _mixture(),
], ids=["laplace", "dirichlet", "gamma", "mixture"])
def test_direct_potential_is_pyros_potential(prior):
    """The traced-free potential equals the one Pyro builds from the model, Jacobian included."""
    vae = _vae_with(prior, prior.event_shape[0])
    x = torch.rand(3, 64)
    ours, transform = direct_potential(vae, x)
    # Pyro finds no biject_to for a mixture's support: give it the components' one (the identity here)
    explicit = {"z": transform.inv} if isinstance(prior, dist.MixtureSameFamily) else None
    theirs, pyro_transform = _pyro_potential(vae, x, explicit)
    u = transform.inv(prior.sample((3,)))
    assert torch.allclose(pyro_transform(transform(u)), u, atol=1e-5)
    assert torch.allclose(ours({"z": u}), theirs({"z": u}), rtol=1e-5)


def test_nuts_on_a_laplace_prior_and_through_pyros_trace():
    laplace = dist.Laplace(torch.zeros(2), torch.ones(2)).to_event(1)
    vae = _digits_vae(prior=laplace)
    x = torch.rand(2, 64)
    analysis = analyze(vae, x, num_chains=2, num_draws=30, warmup=30, num_particles=200, optimise_particles=64,
                       ppc_draws=5, progress=False)
    z = analysis.idata.posterior["z"]
    assert z.shape == (2, 30, 3, 2, 2) and np.isfinite(z.values).all()
    assert analysis.nuts.extra["potential"] == "direct"

    class MyVAE(VAE):  # a model of its own: sampled through Pyro's tracing, same posterior
        def model(self, x):
            return super().model(x)

    mine = MyVAE(vae.prior, vae.guide_dist, vae.decoder, vae.likelihood, 2, (8, 8)).eval()
    traced = run_nuts(mine, x, num_chains=1, num_draws=20, warmup=20, progress=False)
    assert traced.extra["potential"] == "pyro-trace" and traced.z.shape == (1, 20, 2, 2)
    assert torch.isfinite(traced.z).all()


def test_nuts_on_a_mixture_prior_directly_and_through_pyros_trace():
    vae = _vae_with(_mixture(), 2)
    x = torch.rand(2, 64)
    direct = run_nuts(vae, x, num_chains=1, num_draws=20, warmup=20, progress=False)
    assert direct.extra["potential"] == "direct" and direct.z.shape == (1, 20, 2, 2)

    class MyVAE(VAE):
        def model(self, x):
            return super().model(x)

    mine = MyVAE(vae.prior, vae.guide_dist, vae.decoder, vae.likelihood, 2, (8, 8)).eval()
    traced = run_nuts(mine, x, num_chains=1, num_draws=20, warmup=20, progress=False)
    assert traced.extra["potential"] == "pyro-trace" and torch.isfinite(traced.z).all()


def test_nuts_on_a_dirichlet_prior_stays_on_the_simplex():
    vae = _vae_with(dist.Dirichlet(torch.full((3,), 0.8)), 3)
    result = run_nuts(vae, torch.rand(2, 64), num_chains=2, num_draws=30, warmup=30, progress=False)
    assert result.z.shape == (2, 30, 2, 3)
    assert (result.z > 0).all() and torch.allclose(result.z.sum(-1), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("prior,words", [
    (dist.Bernoulli(torch.full((3,), 0.5)).to_event(1), ["discrete", "NUTS cannot"]),
    (dist.OneHotCategorical(torch.ones(3) / 3), ["discrete", "NUTS cannot", "OneHotCategorical"]),
], ids=["bernoulli", "one-hot"])
def test_priors_nuts_cannot_sample_are_refused_before_any_work(prior, words, monkeypatch):
    vae = _digits_vae(latent_dim=3)
    vae.prior = FixedDistribution(prior)
    x = torch.rand(2, 64)
    monkeypatch.setattr("pyro_vae.inference.analysis.run_nuts", lambda *a, **k: pytest.fail("NUTS ran"))
    for call in (lambda: check_nuts_support(vae), lambda: run_nuts(vae, x, progress=False),
                 lambda: analyze(vae, x, progress=False)):
        with pytest.raises(PyroVAEError) as info:
            call()
        for word in words:
            assert word.lower() in str(info.value).lower(), str(info.value)


def test_the_sphere_through_pyros_trace_is_refused_before_any_work(monkeypatch):
    """The plain VAE samples the sphere by augmentation (tests/test_sphere.py); a model of its own, traced
    by Pyro, has no such augmentation and is refused before NUTS runs."""
    base = _digits_vae(latent_dim=3)

    class OwnModel(VAE):
        def model(self, x):
            super().model(x)

    vae = OwnModel(FixedDistribution(dist.ProjectedNormal(torch.tensor([3.0, 0.0, 0.0]))), base.guide_dist,
                   base.decoder, base.likelihood, 3, (8, 8))
    with pytest.raises(PyroVAEError, match="augmented density"):
        run_nuts(vae, torch.rand(2, 64), progress=False)


def test_a_discrete_latent_site_in_the_model_is_refused():
    base = _digits_vae()

    class WithComponent(VAE):
        def model(self, x):
            import pyro

            with pyro.plate("points", x.shape[0], dim=-1):
                pyro.sample("component", dist.Categorical(torch.ones(3) / 3))
            return super().model(x)

    vae = WithComponent(base.prior, base.guide_dist, base.decoder, base.likelihood, 2, (8, 8))
    with pytest.raises(PyroVAEError, match="latent site 'component'.*discrete"):
        check_nuts_support(vae, torch.rand(2, 64))


def test_bad_arguments_are_refused():
    vae, x = linear_gaussian()
    for kwargs, message in [({"num_chains": 0}, "num_chains"), ({"num_draws": -1}, "num_draws"),
                            ({"warmup": -5}, "warmup"), ({"indices": [1, 1, 2]}, "distinct"),
                            ({"labels": [1]}, "labels")]:
        with pytest.raises(PyroVAEError, match=message):
            analyze(vae, x, progress=False, **kwargs)
    with pytest.raises(PyroVAEError, match="no encoder"):
        pointwise_guide(VAE(vae.prior, _NoEncoder(), vae.decoder, vae.likelihood, 2, (2, 3)), x, progress=False)


class _NoEncoder(nn.Module):
    def forward(self, x):
        return dist.Normal(torch.zeros(len(x), 2), 1.0).to_event(1)


# --------------------------------------------------------------------------- pyro-vae analyze


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    train(tiny_config(latent_dim=2), out, progress=False)
    return out


def test_cli_analyze_writes_idata_summary_gaps_and_figures(tiny_run, tmp_path, capsys):
    out = tmp_path / "analysis"
    code = main(["analyze", str(tiny_run), "--indices", "3", "40", "--chains", "2", "--draws", "80",
                 "--warmup", "80", "--particles", "1000", "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "R-hat max" in printed and "amortization" in printed and "idata.nc" in printed
    for name in ("idata.nc", "summary.csv", "summary.txt", "gaps.json"):
        assert (out / name).stat().st_size > 100, name
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == ["pair_obs3.png", "pair_obs40.png", "posterior_predictive.png", "prior_vs_posterior.png",
                       "rank.png", "trace.png"]
    assert all((out / "figures" / f).stat().st_size > 5000 for f in figures)

    idata = load_inference_data(out / "idata.nc")
    assert list(idata.posterior["obs"].values) == [3, 40]
    assert idata.posterior["z"].shape == (2, 80, 3, 2, 2)
    assert idata.attrs["split"] == "test" and str(tiny_run) in idata.attrs["run"]
    summary = pd.read_csv(out / "summary.csv", index_col=[0, 1])
    np.testing.assert_allclose(summary.loc[(40, 0), "mean"],
                               idata.posterior["z"].sel(inference="nuts", obs=40, latent=0).mean(), rtol=1e-5)

    # log p(x) of each data point against quadrature over the 2-D latent space of the trained decoder
    import pyro_vae

    run = pyro_vae.load_run(tiny_run)
    x = run.dataset().test[[3, 40]]
    assert torch.equal(torch.as_tensor(idata.observed_data["x"].values), x)
    grid = torch.linspace(-7, 7, 401)
    z = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    gaps = json.loads((out / "gaps.json").read_text())
    with torch.no_grad():
        for n, row in enumerate(gaps["per_obs"]):
            log_joint = run.vae.prior().log_prob(z) + run.vae.likelihood(run.vae.decoder(z)).log_prob(x[n])
            quadrature = torch.logsumexp(log_joint.double(), 0).item() + 2 * math.log(grid[1] - grid[0])
            assert abs(row["log_px"] - quadrature) < 0.03, (row["log_px"], quadrature)
            assert row["gap"] > -0.03 and row["approximation_gap"] > -0.03 and row["amortization_gap"] > -0.03


@pytest.mark.parametrize("args,message", [
    (["--chains", "0"], "--chains must be >= 1, got 0"),
    (["--draws", "0"], "--draws must be >= 1, got 0"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--obs", "0"], "--obs must be >= 1, got 0"),
    (["--obs", "100000"], "the test split has"),
    (["--indices", "3", "100000"], "indices out of range for the test split"),
    (["--indices", "-1"], "indices out of range"),
    (["--indices", "2", "2"], "distinct"),
], ids=["chains", "draws", "warmup", "obs", "too-many-obs", "index", "negative-index", "repeated-index"])
def test_cli_analyze_bad_input_is_one_line_exit_2_and_nothing_written(args, message, tiny_run, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main(["analyze", str(tiny_run), "--out", str(out), "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_analyze_run_checks_its_arguments_before_loading(tmp_path):
    from pyro_vae.inference.analysis import analyze_run

    for kwargs, message in [({"num_chains": 0}, "num_chains"), ({"num_draws": 0}, "num_draws"),
                            ({"warmup": -1}, "warmup"), ({"obs": 2, "indices": [1]}, "not both"),
                            ({"split": "training"}, "unknown split")]:
        with pytest.raises(PyroVAEError, match=message):
            analyze_run(tmp_path / "not-even-a-directory", **kwargs)


def test_cli_analyze_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["analyze", str(tmp_path / "empty"), "--quiet"]) == 2
    assert "is not a pyro-vae run directory" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert list((tmp_path / "empty").iterdir()) == []


def test_trace_and_rank_plots_show_every_analysed_point(lg_analysis, tmp_path):
    """Three analysed images, three in each figure (the figures said nothing when they showed two)."""
    import matplotlib.pyplot as plt

    from pyro_vae.inference.analysis_plots import _selection, plot_rank, plot_trace

    _, _, analysis = lg_analysis
    assert _selection(analysis.idata, 6, 3)["obs"] == [5, 9, 11]
    plot_trace(analysis.idata, tmp_path / "trace.png")
    plot_rank(analysis.idata, tmp_path / "rank.png")
    assert (tmp_path / "trace.png").stat().st_size > 5000 and (tmp_path / "rank.png").stat().st_size > 5000
    plt.close("all")
