"""The answer without hidden bias: random subsets, a mixture that stays a mixture, the prior gap, the
parameter-matched control and published figures only where they are comparable."""

import dataclasses
import json
import math

import pyro.distributions as dist
import pytest
import torch

from pyro_vae import train
from pyro_vae.cli import main
from pyro_vae.config_file import published_comparison
from pyro_vae.data import Dataset
from pyro_vae.inference import evaluate as evaluate_module
from pyro_vae.inference.evaluate import evaluate, health_warnings
from pyro_vae.inference.metrics import components_in_use, parameter_counts, prior_gap
from pyro_vae.models.mixtures import MixtureOfGaussians, effective_number
from pyro_vae.models.vae import build_vae
from pyro_vae.run_dir import load_run
from pyro_vae.study.settings import compare_settings, parameter_matched_settings, stale_fields
from pyro_vae.subsets import random_subset

from conftest import tiny_config


# --------------------------------------------------------------------------- the subset rule


def test_a_subset_is_seeded_random_nested_and_recorded():
    a, b = random_subset(1000, 50, seed=3), random_subset(1000, 50, seed=3)
    assert torch.equal(a.indices, b.indices) and len(set(a.indices.tolist())) == 50
    assert not torch.equal(a.indices, torch.arange(50))  # not a prefix
    assert not torch.equal(a.indices, random_subset(1000, 50, seed=4).indices)
    assert torch.equal(random_subset(1000, 80, seed=3).indices[:50], a.indices)  # nested
    assert a.record() | {"rule": None} == {"n": 50, "of": 1000, "seed": 3, "rule": None}
    whole = random_subset(10, None, seed=3)
    assert whole.whole and torch.equal(whole.indices, torch.arange(10)) and whole.record()["seed"] is None
    x = torch.arange(1000.0)[:, None]
    assert torch.equal(a.take(x)[:, 0].long(), a.indices)
    with pytest.raises(ValueError):
        a.take(x[:10])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    return train(tiny_config(epochs=6, latent_dim=4), tmp_path_factory.mktemp("u") / "run", data=digits,
                 progress=False)


def _sorted_and_shuffled(vae, digits: Dataset) -> tuple[Dataset, Dataset]:
    """The test split sorted, as static MNIST's is by class: here by each image's rate KL(q(z|x) || p(z))
    under the trained model (closed form), a sort that the aggregate posterior's numbers depend on (the
    8x8 digits' classes differ too little for a small model), and the split as it comes (shuffled)."""
    from pyro_vae.inference.metrics import rate_and_distortion

    order = torch.argsort(rate_and_distortion(vae, digits.test)["rate"], stable=True)
    sort = dataclasses.replace(digits, test=digits.test[order], test_labels=digits.test_labels[order])
    return sort, digits


def _close(a, b, sigmas: float = 3.0) -> bool:
    (ma, sa), (mb, sb) = a, b
    return abs(ma - mb) <= sigmas * math.hypot(sa, sb)


def test_metrics_of_a_class_sorted_test_split_equal_its_shuffled_copy(trained, digits, monkeypatch):
    """The aggregate posterior takes 60 of the 179 test points: a prefix of the sorted split would be its
    60 lowest-rate images; a random subset describes the split, sorted or not."""
    monkeypatch.setattr(evaluate_module, "AGGREGATE_POINTS", 60)
    sort, shuffled = _sorted_and_shuffled(trained.vae, digits)
    results = [evaluate(load_run(trained.path, data=d), num_particles=20, num_samples=60, progress=False, save=False)
               for d in (sort, shuffled)]
    a, b = (r["aggregate_posterior"] for r in results)
    for key in ("rate_same_points", "mutual_information", "marginal_kl"):
        assert _close(a[key], b[key]), (key, a[key], b[key])
    assert _close(results[0]["log_likelihood"], results[1]["log_likelihood"], 0.5)  # the same 179 points
    assert results[0]["subsets"]["aggregate_posterior"] == results[1]["subsets"]["aggregate_posterior"]
    assert results[0]["subsets"]["aggregate_posterior"] | {"rule": None} == {"n": 60, "of": 179, "seed": 0,
                                                                               "rule": None}
    # the control: what a prefix of the sorted split would measure is not the split
    from pyro_vae.inference.metrics import mean_and_stderr, rate_and_distortion

    prefix = mean_and_stderr(rate_and_distortion(trained.vae, sort.test[:60])["rate"])  # "rate on the same points"
    assert not _close(prefix, b["rate_same_points"]), (prefix, b["rate_same_points"])


def test_reconstruct_draws_a_random_subset_or_named_indices(trained, tmp_path, capsys):
    out = tmp_path / "r.png"
    assert main(["reconstruct", str(trained.path), "--n", "8", "--seed", "2", "--out", str(out)]) == 0
    assert out.is_file()
    assert main(["reconstruct", str(trained.path), "--indices", "0,5,17", "--out", str(tmp_path / "i.png")]) == 0
    capsys.readouterr()
    for bad in ("0,x", "0,100000", ""):
        assert main(["reconstruct", str(trained.path), "--indices", bad, "--out", str(tmp_path / "b.png")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--indices" in err[0]
    assert not (tmp_path / "b.png").exists()


def test_reuse_loglik_keeps_the_saved_values_and_refuses_other_points(trained):
    first = evaluate(trained, num_particles=20, num_samples=60, progress=False)
    again = evaluate(trained, num_particles=20, num_samples=60, progress=False, reuse_loglik=True)
    assert again["log_likelihood"] == pytest.approx(first["log_likelihood"]) and again["log_likelihood_reused"]
    from pyro_vae.errors import PyroVAEError

    with pytest.raises(PyroVAEError, match="--reuse-loglik"):
        evaluate(trained, num_particles=21, num_samples=60, progress=False, reuse_loglik=True)
    with pytest.raises(PyroVAEError, match="--reuse-loglik"):
        evaluate(trained, num_particles=20, max_points=50, num_samples=60, progress=False, reuse_loglik=True)


# --------------------------------------------------------------------------- a mixture that stays a mixture


def test_uniform_mixture_matches_mixture_same_family_and_learns_no_weights():
    torch.manual_seed(0)
    prior = MixtureOfGaussians(3, components=7, weights="uniform")
    with torch.no_grad():
        prior.means.normal_()
        prior.log_scales.uniform_(-1, 0.5)
    assert "logits" not in dict(prior.named_parameters()) and "means" in dict(prior.named_parameters())
    reference = dist.MixtureSameFamily(dist.Categorical(probs=torch.full((7,), 1 / 7)),
                                       dist.Normal(prior.means, prior.log_scales.exp()).to_event(1))
    z = torch.randn(50, 3) * 2
    assert torch.allclose(prior().log_prob(z), reference.log_prob(z), atol=1e-4)
    assert torch.allclose(prior.log_density(z), reference.log_prob(z), atol=1e-4)
    learned = MixtureOfGaussians(3, components=7, weights="learned")
    assert "logits" in dict(learned.named_parameters())
    with pytest.raises(Exception, match="unknown mixture weights"):
        MixtureOfGaussians(3, components=7, weights="sometimes")


def _collapsed_vae(digits, spread: bool):
    """A trained-looking VAE whose mixture prior has all components but one far from every code (collapsed),
    or its components at codes of training images (spread)."""
    vae = build_vae(tiny_config(prior="mog", prior_components=20, latent_dim=2, prior_weights="uniform"),
                    digits.dim, digits.image_shape, digits.binary).eval()
    with torch.no_grad():
        codes = vae.guide_dist(digits.train[:20]).mean
        vae.prior.means.copy_(codes if spread else torch.full_like(codes, 1e3))
        vae.prior.means[0] = codes.mean(0)
        vae.prior.log_scales.fill_(math.log(codes.std(0).mean().item() + 0.1) if spread else 0.0)
    return vae


def test_components_in_use_sees_a_collapsed_mixture(digits):
    torch.manual_seed(0)
    collapsed = components_in_use(_collapsed_vae(digits, spread=False), digits.test)
    spread = components_in_use(_collapsed_vae(digits, spread=True), digits.test)
    assert collapsed["num_components"] == 20 and collapsed["components_in_use"] == pytest.approx(1.0, abs=1e-3)
    assert collapsed["weights_effective_number"] == pytest.approx(20.0)
    assert spread["components_in_use"] > 2.0 * 20 / 10
    info = {"status": "finished", "best_epoch": 1, "epochs_completed": 2}
    metrics = {"rate": (5.0, 0.1), "active_units": 2}
    warned = health_warnings(info, 2, {**metrics, "mixture": collapsed})
    assert any(w.startswith("mixture collapsed: 1.0 of 20 components") for w in warned)
    assert not any("mixture" in w for w in health_warnings(info, 2, {**metrics, "mixture": spread}))
    assert components_in_use(build_vae(tiny_config(), digits.dim, digits.image_shape, digits.binary), digits.test) is None
    assert effective_number(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_number(torch.ones(5)) == pytest.approx(5.0)


def test_reseeding_brings_dead_components_back_to_the_codes(digits):
    vae = _collapsed_vae(digits, spread=False)
    vae.prior.reseed = True
    before = components_in_use(vae, digits.train)["components_in_use"]
    done = vae.prior.after_epoch(vae.guide_dist, digits.train, torch.Generator().manual_seed(0))
    assert done["components_reseeded"] == 19 and done["components_in_use"] == pytest.approx(before, rel=0.05)
    assert vae.prior.means.abs().max() < 100  # none left at 1e3
    torch.manual_seed(1)
    assert components_in_use(vae, digits.train)["components_in_use"] > 5 * before
    vae.prior.reseed = False
    assert vae.prior.after_epoch(vae.guide_dist, digits.train, torch.Generator()) is None


def test_training_with_reseeding_records_it_and_is_reproducible(digits, tmp_path):
    config = tiny_config(prior="mog", prior_components=30, latent_dim=2, epochs=2, prior_weights="uniform",
                         prior_reseed=True)
    a = train(config, tmp_path / "a", data=digits, progress=False)
    b = train(config, tmp_path / "b", data=digits, progress=False)
    history = json.loads((a.path / "history.json").read_text())
    assert all("components_reseeded" in r and "components_in_use" in r for r in history)
    assert torch.equal(a.vae.prior.means, b.vae.prior.means)


# --------------------------------------------------------------------------- what the prior costs


def test_prior_gap_matches_a_brute_force_sum_over_the_training_posteriors(digits):
    torch.manual_seed(0)
    vae = build_vae(tiny_config(latent_dim=2), digits.dim, digits.image_shape, digits.binary).eval()
    x, train_x = digits.test[:15], digits.train[:40]
    torch.manual_seed(5)
    got = prior_gap(vae, x, train_x, num_particles=3, batch_size=len(x))
    torch.manual_seed(5)
    with torch.no_grad():
        z = vae.guide_dist(x).sample((3,))  # the same draws
        q_train = vae.guide_dist(train_x)
        loc, scale = q_train.base_dist.loc, q_train.base_dist.scale
        per_point = []
        for n in range(len(x)):
            terms = []
            for s in range(3):
                comps = torch.stack([torch.distributions.Normal(loc[m].double(), scale[m].double())
                                     .log_prob(z[s, n].double()).sum() for m in range(len(train_x))])
                log_q = torch.logsumexp(comps, 0) - math.log(len(train_x))
                terms.append(log_q - vae.prior().log_prob(z[s, n]).double())
            per_point.append(torch.stack(terms).mean())
    brute = torch.stack(per_point)
    assert got["gap"][0] == pytest.approx(brute.mean().item(), abs=1e-4)
    assert got["gap"][1] == pytest.approx((brute.std() / math.sqrt(len(x))).item(), abs=1e-4)
    assert got["num_train_points"] == 40


def test_the_aggregate_posterior_of_a_sphere_guide_is_its_mixture(digits):
    from pyro_vae.inference.metrics import _log_q_aggregate
    from pyro_vae.models.sphere import PowerSpherical

    torch.manual_seed(0)
    vae = build_vae(tiny_config(prior="sphere", latent_dim=5), digits.dim, digits.image_shape, digits.binary).eval()
    train_x = digits.train[:30]
    with torch.no_grad():
        q = vae.guide_dist(train_x)
        assert isinstance(q, PowerSpherical)
        z = vae.guide_dist(digits.test[:7]).sample()
        brute = torch.logsumexp(q.log_prob(z[:, None, :]).double(), 1) - math.log(30)
        assert torch.allclose(_log_q_aggregate(vae, z, train_x, chunk=3).double(), brute, atol=1e-4)


def test_parameter_counts_by_part(digits):
    vae = build_vae(tiny_config(prior="vamp", prior_components=5), digits.dim, digits.image_shape, digits.binary)
    counts = parameter_counts(vae)
    assert counts["prior"] == 5 * digits.dim  # the pseudo-inputs alone: the guide belongs to the encoder
    assert counts["total"] == sum(p.numel() for p in vae.parameters())
    assert counts["encoder"] == sum(p.numel() for p in vae.guide_dist.parameters())


# --------------------------------------------------------------------------- the parameter-matched control


def test_the_parameter_matched_run_reaches_the_learned_priors_count(digits):
    base = tiny_config(prior_components=50)
    settings = compare_settings(base, ["normal", "vamp"], [2], 1)
    wide = parameter_matched_settings(settings, "vamp", digits.dim, digits.image_shape)
    assert [s.name for s in wide] == ["normal-wide-z2-s0"] and wide[0].config.prior == "normal"

    def total(config):
        return sum(p.numel() for p in build_vae(config, digits.dim, digits.image_shape, True).parameters())

    target = total(settings[1].config)
    width = wide[0].config.decoder_hidden_dim
    assert total(wide[0].config) >= target > total(dataclasses.replace(wide[0].config, decoder_hidden_dim=width - 1))
    assert width > base.hidden_dim
    from pyro_vae.errors import PyroVAEError

    with pytest.raises(PyroVAEError, match="not among the study's priors"):
        parameter_matched_settings(settings, "flow", digits.dim, digits.image_shape)


def test_a_prior_option_a_run_does_not_use_leaves_it_current(tmp_path, digits):
    settings = compare_settings(tiny_config(epochs=1), ["normal"], [2], 1)
    run = tmp_path / "runs" / settings[0].name
    train(settings[0].config, run, data=digits, progress=False)
    changed = dataclasses.replace(settings[0], config=dataclasses.replace(settings[0].config, prior_weights="uniform"))
    assert stale_fields(tmp_path, changed) == []
    wider = dataclasses.replace(settings[0], config=dataclasses.replace(settings[0].config, hidden_dim=65))
    assert stale_fields(tmp_path, wider) == ["hidden_dim=64 (wanted 65)"]


# --------------------------------------------------------------------------- published figures


def test_a_published_figure_is_comparable_only_in_its_own_setting():
    published = {"source": "x", "normal": -88.5,
                 "setting": {"dataset": "binarized-mnist", "prior_components": 500, "k": 5000, "epochs": 2000,
                             "test_points": 10000}}
    recipe = tiny_config(dataset="binarized-mnist", prior_components=500, epochs=300)
    assert published_comparison(published, recipe, 5000, 10000, "vamp") == (
        [], "budget 300 of the source's up to 2000 epochs (15%)")
    assert published_comparison(published, dataclasses.replace(recipe, epochs=2000), 5000, 10000, "vamp") == ([], "")
    differs, _ = published_comparison(published, dataclasses.replace(recipe, dataset="x.npy", prior_components=10,
                                                                     epochs=3), 200, 3000, "vamp")
    assert differs == ["dataset 'x.npy' (source: 'binarized-mnist')", "K = 200 importance samples (source: 5000)",
                       "3000 test points (source: 10000)", "K = 10 components (source: 500)",
                       "a budget of 3 epochs (source: up to 2000)"]
    # the components count only for priors that have them
    assert published_comparison(published, dataclasses.replace(recipe, prior_components=10), 5000, 10000,
                                "normal")[0] == []
    assert published_comparison({"source": "x", "normal": -1.0}, recipe, 5000, 10000, "normal")[0] == [
        "the source's setting is not stated ([study.published.setting])"]


def test_a_study_marks_published_figures_it_cannot_compare(tmp_path):
    common = ('hidden_dim = 16\nhidden_layers = 1\nepochs = 1\n\n[study]\npriors = ["normal"]\nlatent_dims = [2]\n'
              'k = 7\n\n[study.published]\nsource = "A. Paper (2020), Table 9"\nnormal = {2 = -99.25}\n')
    (tmp_path / "s.toml").write_text(common + 'setting = { dataset = "digits", k = 5000 }\n')
    assert main(["compare", "--config", str(tmp_path / "s.toml"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    header, row = [line for line in report.splitlines() if line.startswith("| ")][:2]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["published"] == "not comparable"
    assert "normal-z2-s0: not comparable: K = 7 importance samples (source: 5000)." in report
    (tmp_path / "t.toml").write_text(common + 'setting = { dataset = "digits", k = 7, epochs = 1 }\n')
    assert main(["compare", "--config", str(tmp_path / "t.toml"), "--out", str(tmp_path / "out2"), "--quiet"]) == 0
    report = (tmp_path / "out2" / "report.md").read_text()
    header, row = [line for line in report.splitlines() if line.startswith("| ")][:2]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["published"] == "-99.25" and "normal-z2-s0: the same setting." in report


def test_the_prior_gap_of_a_slow_guide_takes_a_recorded_subset(digits, tmp_path, monkeypatch):
    """A guide without a fast aggregate density (full covariance) evaluates N q(z|x_n) per code: the prior
    gap then takes SLOW_GAP_POINTS random test points, and says so; a diagonal Normal guide takes them all."""
    monkeypatch.setattr(evaluate_module, "SLOW_GAP_POINTS", 40)
    slow = train(tiny_config(epochs=1, guide="full-covariance"), tmp_path / "slow", data=digits, progress=False)
    fast = train(tiny_config(epochs=1), tmp_path / "fast", data=digits, progress=False)
    for run, n in ((slow, 40), (fast, len(digits.test))):
        m = evaluate(run, num_particles=5, num_samples=40, progress=False, save=False)
        assert m["subsets"]["prior_gap"]["n"] == n and math.isfinite(m["prior_gap"]["gap"][0])
