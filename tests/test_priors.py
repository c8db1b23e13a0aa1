"""The prior zoo: support, shapes, normalisation (by quadrature or a reference sampler), learning,
and the seam that takes a user's own prior."""

import json
import math
from pathlib import Path

import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy.stats import ks_2samp

from pyro_vae import build_vae, load_run, train
from pyro_vae.cli import main
from pyro_vae.errors import PyroVAEError
from pyro_vae.models.priors import PRIORS, PriorOptions, build_prior

from conftest import tiny_config

DIM_LIMITS = {"sphere": (2, 8), "power-spherical": (2, 8), "vmf": (2, 8), "projected-normal": (2, 4),
              "dirichlet": (2, 8), "relaxed-categorical": (2, 8)}
SIMPLEX_OR_SPHERE = {"sphere", "power-spherical", "vmf", "projected-normal", "dirichlet", "relaxed-categorical"}
EUCLIDEAN = sorted(set(PRIORS) - SIMPLEX_OR_SPHERE)
QUADRATURE = sorted(set(EUCLIDEAN) - {"flow"})  # random spline flows are too spiky for a grid: see below
LEARNABLE = ["learned-normal", "mog", "mog-enum", "vamp", "flow"]

options_strategy = st.builds(
    PriorOptions,
    scale=st.floats(0.3, 3.0),
    df=st.floats(1.0, 30.0),
    components=st.integers(1, 5),
    learnable=st.booleans(),
    flow=st.sampled_from(["spline-coupling", "affine-autoregressive"]),
    flow_layers=st.integers(1, 2),
    concentration=st.floats(0.5, 5.0),
    temperature=st.floats(0.3, 2.0),
    data_dim=st.just(6),
)


def make_prior(name: str, d: int, options: PriorOptions, seed: int = 0):
    """A prior with its learnable parameters moved off their initial values (so the density is not trivial)."""
    torch.manual_seed(seed)  # Pyro's flow layers initialise from the global stream
    if name == "vamp":
        cfg = tiny_config(prior="vamp", latent_dim=d, prior_components=options.components)
        prior = build_vae(cfg, 6, (2, 3), False).prior
    else:
        prior = build_prior(name, d, options)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return prior


def allowed(name: str, d: int) -> bool:
    lo, hi = DIM_LIMITS.get(name, (1, 8))
    return lo <= d <= hi


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(PRIORS)), d=st.integers(1, 5), options=options_strategy,
       n=st.integers(1, 7), seed=st.integers(0, 1000))
def test_samples_lie_in_the_support_and_log_prob_has_the_right_shape(name, d, options, n, seed):
    assume(allowed(name, d))
    p = make_prior(name, d, options, seed)()
    assert p.event_shape == (d,) and p.batch_shape == ()
    torch.manual_seed(seed)
    z = p.sample((n, 3))
    assert z.shape == (n, 3, d)
    assert bool(p.support.check(z).all())
    lp = p.log_prob(z)
    assert lp.shape == (n, 3)
    assert torch.isfinite(lp).all()


def _integrate_line(density) -> float:
    """The integral of ``density`` over R: a fine uniform grid on [-8, 8] (sharp features of
    spline flows) plus the tails through z = tan(theta) (heavy tails, e.g. Cauchy)."""
    x = torch.linspace(-8, 8, 32_001, dtype=torch.float64)
    total = torch.trapezoid(density(x), x)
    theta = torch.linspace(math.atan(8), math.pi / 2, 20_001, dtype=torch.float64)[:-1]
    for sign in (1, -1):
        z = sign * torch.tan(theta)
        total = total + torch.trapezoid(density(z) / torch.cos(theta) ** 2, theta)
    return total.item()


def _density(p, z):
    inside = p.support.check(z)
    safe = torch.where(inside[..., None] if inside.dim() < z.dim() else inside, z, torch.zeros_like(z))
    return torch.where(inside, p.log_prob(safe).exp(), torch.zeros(()))


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(QUADRATURE), options=options_strategy, seed=st.integers(0, 1000))
def test_density_integrates_to_one_in_1d(name, options, seed):
    p = make_prior(name, 1, options, seed)()
    with torch.no_grad():
        total = _integrate_line(lambda z: _density(p, z.float()[:, None]).double())
    assert total == pytest.approx(1.0, abs=3e-3)


@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(sorted(set(QUADRATURE) - {"student-t"})), options=options_strategy,
       seed=st.integers(0, 1000))
def test_density_integrates_to_one_in_2d(name, options, seed):
    """A fine uniform grid (spacing 0.01, enough for the sharp features of spline flows) over a box
    that holds all but a negligible part of the mass (student-t's heavy tails are checked in 1-D)."""
    assume(options.scale <= 1.5)
    p = make_prior(name, 2, options, seed)()
    x = torch.linspace(-8, 8, 1601, dtype=torch.float64)
    z0, z1 = torch.meshgrid(x, x, indexing="ij")
    with torch.no_grad():
        dens = _density(p, torch.stack([z0, z1], -1).reshape(-1, 2).float()).double().reshape(z0.shape)
    total = torch.trapezoid(torch.trapezoid(dens, x, dim=1), x).item()
    tolerance = 1e-2
    if name == "uniform":  # the box's edges fall between grid nodes: each of the two trapezoid sums
        tolerance += (x[1] - x[0]).item() / (options.scale * math.sqrt(3))  # is off by up to h / (2 a)
    assert total == pytest.approx(1.0, abs=tolerance)


@settings(max_examples=15, deadline=None)
@given(d=st.integers(1, 4), options=options_strategy, seed=st.integers(0, 1000))
def test_flow_density_is_the_change_of_variables(d, options, seed):
    """Freshly initialised spline flows have ridges too sharp for quadrature, so the flow prior's
    density is checked against its definition instead: log p(z) = log N(T^-1(z); 0, I) +
    log |det d T^-1 / dz|, with the Jacobian from autograd, not from Pyro's log_abs_det_jacobian."""
    p = make_prior("flow", d, options, seed)()

    def inverse(z):
        for t in reversed(p.transforms):
            z = t.inv(z)
        return z

    torch.manual_seed(seed)
    for z in p.sample((4,)).detach():
        u = inverse(z)
        jacobian = torch.autograd.functional.jacobian(inverse, z)
        expected = torch.distributions.Normal(0.0, 1.0).log_prob(u).sum() + torch.linalg.slogdet(jacobian)[1]
        # float32 through steep spline bins: agreement to 1e-2 nats (a wrong log-det is off by O(1))
        assert p.log_prob(z).item() == pytest.approx(expected.item(), abs=1e-2)


@pytest.mark.parametrize("name", ["sphere", "projected-normal"])
@pytest.mark.parametrize("concentration", [0.5, 3.0])
def test_circle_densities_integrate_to_one(name, concentration):
    p = build_prior(name, 2, PriorOptions(concentration=concentration))()
    t = torch.linspace(-math.pi, math.pi, 20_001)
    z = torch.stack([t.cos(), t.sin()], -1)
    assert torch.trapezoid(p.log_prob(z).exp(), t).item() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("concentration", [0.7, 1.0, 4.0])
def test_dirichlet_density_integrates_to_one_on_the_2_simplex(concentration):
    p = build_prior("dirichlet", 2, PriorOptions(concentration=concentration))()
    t = torch.linspace(0, 1, 200_001, dtype=torch.float64)[1:-1]
    z = torch.stack([t, 1 - t], -1)
    assert torch.trapezoid(p.log_prob(z.float()).exp().double(), t).item() == pytest.approx(1.0, abs=2e-3)


def test_sphere_uniform_matches_a_reference_sampler():
    torch.manual_seed(0)
    z = build_prior("sphere", 5, PriorOptions())().sample((4000,))
    reference = torch.randn(4000, 5)
    reference = reference / reference.norm(dim=-1, keepdim=True)
    assert ks_2samp(z[:, 0].numpy(), reference[:, 0].numpy()).pvalue > 1e-3
    assert z.norm(dim=-1).sub(1).abs().max() < 1e-5


@pytest.mark.parametrize("temperature", [0.3, 1.0])
def test_relaxed_categorical_matches_a_gumbel_softmax_reference_sampler(temperature):
    torch.manual_seed(0)
    k, n = 4, 4000
    z = build_prior("relaxed-categorical", k, PriorOptions(temperature=temperature))().sample((n,))
    gumbel = -torch.log(-torch.log(torch.rand(n, k)))
    reference = torch.softmax(gumbel / temperature, dim=-1)
    for i in range(k):
        assert ks_2samp(z[:, i].numpy(), reference[:, i].numpy()).pvalue > 1e-3
    counts = torch.bincount(z.argmax(-1), minlength=k).float() / n
    assert (counts - 1 / k).abs().max() < 0.04


def test_enumerated_mixture_marginal_equals_the_sum_over_components():
    prior = make_prior("mog-enum", 2, PriorOptions(components=3), seed=1)
    z = torch.randn(10, 2)
    comp = prior.components()
    by_hand = torch.logsumexp(torch.log_softmax(prior.logits, -1) + comp.log_prob(z[:, None, :]), dim=-1)
    assert torch.allclose(prior().log_prob(z), by_hand, atol=1e-5)


@pytest.mark.parametrize("name", LEARNABLE)
def test_learnable_prior_parameters_change_during_training(name, digits, tmp_path):
    run = train(tiny_config(prior=name, epochs=1, prior_components=3), tmp_path / name, data=digits, progress=False)
    fresh = build_vae(run.config, digits.dim, digits.image_shape, digits.binary)
    trained, initial = dict(run.vae.prior.named_parameters()), dict(fresh.prior.named_parameters())
    assert trained, f"{name} has no parameters"
    assert any(not torch.allclose(trained[k], initial[k]) for k in trained)


def test_fixed_mixture_has_no_parameters():
    assert list(build_prior("mog", 2, PriorOptions(learnable=False)).parameters()) == []


# --------------------------------------------------------------------------- the seam and its errors


def test_user_prior_as_distribution_function_and_module():
    cauchy = dist.Cauchy(torch.zeros(3), torch.ones(3)).to_event(1)
    assert build_prior(cauchy, 3)() is cauchy
    assert build_prior(lambda d: dist.Cauchy(torch.zeros(d), torch.ones(d)).to_event(1), 3)().event_shape == (3,)

    class Shifted(torch.nn.Module):
        def __init__(self, latent_dim):
            super().__init__()
            self.shift = torch.nn.Parameter(torch.zeros(latent_dim))

        def forward(self):
            return dist.Normal(self.shift, 1.0).to_event(1)

    prior = build_prior(Shifted, 4)
    assert [n for n, _ in prior.named_parameters()] == ["shift"]


class NoLogProb(dist.TorchDistribution):
    arg_constraints = {}
    support = dist.constraints.real_vector

    def __init__(self):
        super().__init__(torch.Size(), torch.Size([2]))

    def sample(self, sample_shape=torch.Size()):
        return torch.zeros(sample_shape + (2,))


class LeavesSupport(NoLogProb):
    support = dist.constraints.independent(dist.constraints.positive, 1)

    def log_prob(self, value):
        return torch.zeros(value.shape[:-1])

    def sample(self, sample_shape=torch.Size()):
        return -torch.ones(sample_shape + (2,))


@pytest.mark.parametrize(
    "spec,latent_dim,message",
    [
        ("cauchy-typo", 2, "unknown prior"),
        ("no_such_module:prior", 2, "cannot import prior"),
        (dist.Normal(torch.zeros(3), 1.0).to_event(1), 2, "event shape"),
        (NoLogProb(), 2, "has no log_prob"),
        (LeavesSupport(), 2, "leave its declared support"),
        ("projected-normal", 7, "latent_dim 2, 3 or 4"),
        ("dirichlet", 1, "latent_dim >= 2"),
    ],
)
def test_bad_priors_are_refused_with_a_clear_message(spec, latent_dim, message):
    with pytest.raises(PyroVAEError, match=message):
        build_prior(spec, latent_dim)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(prior_components=0), "prior_components must be >= 1"),
        (dict(prior_df=0.0), "prior_df must be > 0"),
        (dict(prior_temperature=-1.0), "prior_temperature must be > 0"),
        (dict(prior="sphere", guide="normal"), "cannot reach the prior's support"),
        (dict(prior="normal", guide="sphere"), "needs a prior on the sphere"),
        (dict(prior="student-t", objective="analytic"), "no closed-form KL is registered for guide"),
        (dict(prior="mog-enum", objective="iwae"), "cannot enumerate"),
    ],
)
def test_bad_prior_settings_fail_before_training(overrides, message, digits, tmp_path):
    with pytest.raises(PyroVAEError, match=message):
        train(tiny_config(**overrides), tmp_path / "run", data=digits, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("guide", ["full-covariance", "iaf"])
def test_richer_guides_train(guide, digits, tmp_path):
    run = train(tiny_config(guide=guide, latent_dim=3, epochs=2), tmp_path / guide, data=digits, progress=False)
    assert run.history[-1]["valid_elbo"] > run.history[0]["valid_elbo"]
    z = run.vae.guide_dist(digits.test[:5]).rsample()
    assert z.shape == (5, 3)


def test_guide_follows_the_support():
    for name, d in [("dirichlet", 3), ("uniform", 2), ("sphere", 3), ("relaxed-categorical", 4)]:
        vae = build_vae(tiny_config(prior=name, latent_dim=d), 64, (8, 8), False)
        z = vae.guide_dist(torch.rand(6, 64)).sample()
        assert bool(vae.prior().support.check(z).all()), name


# --------------------------------------------------------------------------- from the command line


def _readme_block(heading: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    after = text[text.index(heading):]
    start = after.index("```python\n") + len("```python\n")
    return after[start: after.index("```", start)]


def test_readme_custom_prior_runs_exactly_as_printed(tmp_path, monkeypatch):
    code = _readme_block("### Your own prior")
    assert len(code.strip().splitlines()) <= 10
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    exec(compile(code, "README.md", "exec"), namespace)
    run = namespace["run"]
    assert run.info["status"] == "finished" and math.isfinite(run.info["test_elbo"])
    assert type(run.vae.prior().base_dist).__name__ == "Cauchy"
    assert (tmp_path / "runs" / "cauchy" / "figures" / "samples.png").is_file()


def test_user_prior_module_attribute_from_the_cli(tmp_path, monkeypatch):
    (tmp_path / "my_priors.py").write_text(
        "import torch, pyro.distributions as dist\n"
        + _readme_block("### Your own prior").split("run = ")[0].split("import pyro_vae")[1]
    )
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--prior", "my_priors:cauchy", "--out", "run", "--quiet", *CLI_TINY]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["prior"] == "my_priors:cauchy"
    assert type(load_run(tmp_path / "run", trust=True).vae.prior().base_dist).__name__ == "Cauchy"
    with pytest.raises(PyroVAEError, match="--trust-prior"):  # a run directory's module is not imported unasked
        load_run(tmp_path / "run")


CLI_TINY = ["--epochs", "2", "--hidden-dim", "64", "--hidden-layers", "1", "--lr", "3e-3"]


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_every_builtin_prior_trains_from_the_cli(name, tmp_path):
    d = 3
    out = tmp_path / name
    assert main(["train", "--prior", name, "--latent-dim", str(d), "--prior-components", "3", "--out", str(out),
                 "--quiet", *CLI_TINY]) == 0
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2 and all(math.isfinite(r["valid_elbo"]) for r in history)
    assert history[1]["valid_elbo"] > history[0]["valid_elbo"]
    run = load_run(out)
    assert type(run.vae.prior).__name__ == type(build_prior(name, d, PriorOptions(data_dim=64), check=False)).__name__
    assert torch.isfinite(run.vae.sample(4)).all()
