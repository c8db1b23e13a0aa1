"""The direct ELBO (pyro_vae.inference.direct): on the same random stream, the loss and the gradients of
Pyro's Trace_ELBO, TraceMeanField_ELBO and RenyiELBO, for every built-in prior and guide family; where
it does not apply, Pyro's ELBO trains; compiled with torch.compile, the same loss again."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO

from pyro_vae import build_vae, train
from pyro_vae.inference.direct import DirectELBO, why_not_direct
from pyro_vae.inference.metrics import log_weights, trace_log_weights
from pyro_vae.inference.objectives import KLWeight, kl_weighted
from pyro_vae.inference.step import TrainingStep
from pyro_vae.models.priors import PRIORS

from conftest import tiny_config

PYRO_ELBOS = {"trace": Trace_ELBO, "analytic": TraceMeanField_ELBO, "iwae": lambda **kw: RenyiELBO(alpha=0.0, **kw)}
CASES = ([("trace", 1, {"prior": p}) for p in sorted(set(PRIORS) - {"mog-enum"})] + [
    ("trace", 1, {"guide": "full-covariance"}), ("trace", 1, {"guide": "iaf"}),
    ("trace", 1, {"prior": "sphere", "guide": "projected-normal"}), ("trace", 1, {"likelihood": "gaussian"}),
    ("trace", 3, {}), ("trace", 3, {"prior": "mog"}), ("analytic", 1, {}), ("analytic", 2, {"prior": "learned-normal"}),
    ("iwae", 4, {}), ("iwae", 4, {"prior": "vamp"}), ("trace", 1, {"guide_scale": "bounded-logvar"}),
])


def _vae(digits, **overrides):
    cfg = tiny_config(latent_dim=3, **overrides)
    torch.manual_seed(0)
    return cfg, build_vae(cfg, digits.dim, digits.image_shape, digits.binary)


def _grads(vae):
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in vae.parameters()]
    for p in vae.parameters():
        p.grad = None
    return grads


@pytest.mark.parametrize("objective,particles,overrides", CASES)
def test_direct_elbo_is_pyros_on_the_same_noise(objective, particles, overrides, digits):
    cfg, vae = _vae(digits, objective=objective, num_particles=particles, **overrides)
    assert why_not_direct(vae, digits.train[:1]) is None
    x, beta = digits.train[:16], torch.tensor(0.7)  # a KL weight, as during warm-up
    elbo = PYRO_ELBOS[objective](num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(3)
    reference = elbo.loss_and_grads(kl_weighted(vae.model), kl_weighted(vae.guide), x, beta)
    pyro_grads = _grads(vae)
    pyro.set_rng_seed(3)
    loss = DirectELBO(vae, objective, particles)(x, beta)
    loss.backward()
    assert loss.item() == pytest.approx(reference, rel=1e-5), (objective, overrides)
    for a, b in zip(_grads(vae), pyro_grads):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3 * max(1.0, b.abs().max().item())), (objective, overrides)


@pytest.mark.parametrize("overrides", [{}, {"prior": "mog"}])
def test_with_beta_one_the_elbo_is_pyros_unweighted(overrides, digits):
    """beta = 1 throughout (no warm-up): the training step passes 1.0 and no KL weight is applied."""
    cfg, vae = _vae(digits, **overrides)
    x = digits.train[:16]
    pyro.set_rng_seed(5)
    reference = Trace_ELBO(max_plate_nesting=1).loss_and_grads(vae.model, vae.guide, x)
    pyro_grads = _grads(vae)
    step = TrainingStep(vae, cfg, KLWeight(1.0, 0.0), jit=False)
    assert step._beta == 1.0
    pyro.set_rng_seed(5)
    assert step.loss_and_grads(x) == pytest.approx(reference, rel=1e-5)
    for a, b in zip(_grads(vae), pyro_grads):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("scale", ["softplus", "bounded-logvar"])
def test_the_parts_densities_are_their_distributions(scale):
    """The tensor functions the direct ELBO uses (the diagonal Normal's draw with its log q, N(0, I)'s and
    the Bernoulli's log-density) give the distributions' numbers and gradients on the same stream."""
    from pyro_vae.models.guides import DiagonalNormal
    from pyro_vae.models.likelihoods import Bernoulli
    from pyro_vae.models.priors import StandardNormal

    torch.manual_seed(0)
    family, prior, likelihood = DiagonalNormal(4, scale), StandardNormal(4), Bernoulli()
    h = torch.randn(6, 8).requires_grad_()  # (at tiny sigma the distribution loses digits recomputing eps from z)
    x = torch.bernoulli(torch.full((6, 10), 0.3))
    decoder = torch.nn.Linear(4, 10)
    results = []
    for fast in (True, False):
        torch.manual_seed(1)
        if fast:
            z, log_q = family.rsample_with_log_prob(h, torch.Size([3]))
            log_p, out = prior.log_density(z), decoder(z)
            log_lik = likelihood.log_density(out, x)
        else:
            q = family(h)
            z = q.rsample(torch.Size([3]))
            log_q, log_p, out = q.log_prob(z), prior().log_prob(z), decoder(z)
            log_lik = likelihood(out).log_prob(x)
        total = (log_lik + log_p - log_q).sum()
        grads = torch.autograd.grad(total, [h, *decoder.parameters()])
        results.append((z, log_q, log_p, log_lik, grads))
    for a, b in zip(results[0][:4], results[1][:4]):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][4], results[1][4]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"prior": "vamp"}, {"prior": "sphere"}, {"prior": "dirichlet"}])
def test_log_weights_are_the_traced_ones_on_the_same_noise(overrides, digits):
    _, vae = _vae(digits, **overrides)
    x = digits.test[:9]
    pyro.set_rng_seed(1)
    direct = log_weights(vae, x, 5)
    pyro.set_rng_seed(1)
    traced = trace_log_weights(vae, x, 5)
    assert direct.shape == traced.shape == (5, 9)
    assert torch.allclose(direct, traced, rtol=1e-5, atol=1e-3)


def test_where_the_direct_elbo_does_not_apply_pyros_trains(digits, tmp_path):
    _, enumerated = _vae(digits, prior="mog-enum")
    assert "TraceEnum_ELBO" in why_not_direct(enumerated)

    class Hierarchical(torch.nn.Module):  # a prior of your own with a Pyro site of its own
        def forward(self):
            scale = pyro.sample("prior_scale", dist.LogNormal(0.0, 0.1))
            return dist.Normal(torch.zeros(3), scale).to_event(1)

    own = build_vae(tiny_config(latent_dim=3), digits.dim, digits.image_shape, digits.binary, prior=Hierarchical())
    assert "prior_scale" in why_not_direct(own)
    step = TrainingStep(own, tiny_config(latent_dim=3), KLWeight(1.0))
    assert step.direct is None and step.elbo_name == "Trace_ELBO" and "prior_scale" in step.not_direct
    run = train(tiny_config(epochs=1, prior="mog-enum"), tmp_path / "enum", data=digits, progress=False)
    assert run.info["elbo"] == "JitTraceEnum_ELBO" and "TraceEnum_ELBO" in run.info["not_direct_because"]
    asked = train(tiny_config(epochs=1, elbo="pyro"), tmp_path / "pyro", data=digits, progress=False)
    assert asked.info["elbo"] == "JitTrace_ELBO" and "not_direct_because" not in asked.info
    direct = train(tiny_config(epochs=1), tmp_path / "direct", data=digits, progress=False)
    assert direct.info["elbo"] == "DirectELBO" and direct.info["compiler"] is None
    assert "training steps" in direct.info["not_compiled_because"]


def test_torch_compile_gives_the_eager_loss_and_gradients(digits):
    """Compiled with torch.compile (Inductor, random numbers drawn as eagerly), the step computes the loss
    and gradients of the uncompiled direct ELBO on the same noise, and a last, smaller batch runs eagerly.
    With the mixture of Gaussians: its compiled plain form against the eager fused one (the compiled N(0, I)
    step is checked against an uncompiled run by the next test)."""
    cfg, vae = _vae(digits, warmup_epochs=2.0, batch_size=32, prior="mog", prior_components=40)
    weight = KLWeight(1.0, 2.0)
    weight.update(1.0)
    compiled = TrainingStep(vae, cfg, weight, jit=True)
    eager = TrainingStep(vae, cfg, weight, jit=False)
    assert compiled.compiler == "torch.compile" and eager.compiler is None
    x = digits.train[:32]
    compiled.compile([x, digits.train[:7]], seed=0)
    for xb in (x, digits.train[32:64], digits.train[:7]):
        pyro.set_rng_seed(5)
        loss = compiled.loss_and_grads(xb)
        grads = _grads(vae)
        pyro.set_rng_seed(5)
        assert loss == pytest.approx(eager.loss_and_grads(xb), rel=1e-5)
        for a, b in zip(grads, _grads(vae)):  # Inductor's fused kernels round differently
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-4 * max(1.0, b.abs().max().item()))


def test_long_runs_train_compiled_and_resume_to_the_same_result(digits, tmp_path, monkeypatch):
    """A run of COMPILE_MIN_STEPS steps or more compiles the direct ELBO with torch.compile (not with a
    prior the compilers are not known to get right); interrupted and resumed, it ends where a run
    trained straight through, uncompiled, ends."""
    from pyro_vae import resume
    from pyro_vae.inference import step as step_module

    cfg = tiny_config(epochs=2)
    straight = train(cfg, tmp_path / "straight", data=digits, progress=False)  # 24 steps: not compiled
    assert straight.info["compiler"] is None and "24 training steps" in straight.info["not_compiled_because"]
    monkeypatch.setattr(step_module, "COMPILE_MIN_STEPS", 20)

    def interrupt(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", data=digits, progress=False, on_epoch_end=interrupt)
    resumed = resume(tmp_path / "cut", data=digits, progress=False)
    assert resumed.info["compiler"] == "torch.compile" and resumed.info["compiled"]
    # compiled and not, the same loss to rounding: the same training path, here across an interruption
    assert [r["valid_elbo"] for r in resumed.history] == pytest.approx([r["valid_elbo"] for r in straight.history],
                                                                        abs=1e-3)
    flow = train(tiny_config(epochs=2, prior="flow"), tmp_path / "flow", data=digits, progress=False)
    assert flow.info["elbo"] == "DirectELBO" and "flow" in flow.info["not_compiled_because"]
