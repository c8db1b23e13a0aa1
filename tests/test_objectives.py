"""The compiled ELBOs (torch.jit) of --elbo pyro: the same objective as the Python ones, for every prior they are
used with."""

import math

import pyro
import pytest
import torch

from pyro_vae import build_vae, train
from pyro_vae.errors import PyroVAEError
from pyro_vae.inference.metrics import log_weights
from pyro_vae.inference.objectives import KLWeight, make_elbo, why_not_compiled
from pyro_vae.inference.step import TrainingStep
from pyro_vae.models.priors import PRIORS, FlowPrior, PriorOptions, build_prior

TRACEABLE = {name for name in PRIORS if build_prior(name, 3, PriorOptions(data_dim=64), check=False).traceable}

from conftest import tiny_config

K = 1000  # particles: the compiled and the Python estimates agree within a few standard errors of this many


def _vae(digits, **overrides):
    cfg = tiny_config(latent_dim=3, elbo="pyro", **overrides)
    torch.manual_seed(0)
    pyro.clear_param_store()
    return cfg, build_vae(cfg, digits.dim, digits.image_shape, digits.binary)


def _stderr_of_sum(vae, x) -> float:
    """The Monte Carlo standard error of a K-particle estimate of sum_n ELBO(x_n)."""
    w = log_weights(vae, x, K).sum(1)  # (K,)
    return w.std().item() / math.sqrt(K)


COMPILED_CASES = [("trace", {"prior": prior}) for prior in sorted(TRACEABLE)] + [
    ("analytic", {}),                                  # CachedJitTraceMeanField_ELBO
    ("trace", {"binarize": True}),                     # Bernoulli likelihood (BernoulliPixels)
    ("trace", {"likelihood": "gaussian"}),
    ("trace", {"guide": "full-covariance"}),
    ("trace", {"guide": "iaf"}),
    ("analytic", {"prior": "laplace", "guide": "iaf"}),
]


@pytest.mark.parametrize("objective,overrides", COMPILED_CASES)
def test_compiled_elbo_estimates_the_same_objective(objective, overrides, digits):
    """For each prior training compiles, and for the other objective, likelihoods and guides: the
    compiled loss matches the Python ELBO's, also after the batch size changes (the last batch of an
    epoch), which is where a trace with frozen shapes would break."""
    cfg, vae = _vae(digits, objective=objective, **overrides)
    model = vae.enumerated_model if vae.enumerated else vae.model
    compiled = make_elbo(objective, K, vae.enumerated, jit=True)
    python = make_elbo(objective, K, vae.enumerated, jit=False)
    for n in (16, 16, 7):
        x = digits.train[:n]
        if cfg.binarize:
            x = torch.bernoulli(x)
        loss = compiled.loss_and_grads(model, vae.guide, x)
        reference = python.loss(model, vae.guide, x)
        assert math.isfinite(loss)
        assert loss == pytest.approx(reference, abs=5 * _stderr_of_sum(vae, x) + 1e-3), (objective, overrides, n)


def test_compiled_elbo_follows_the_kl_weight_during_warmup(digits):
    """beta reaches the compiled ELBO as an argument, not as the constant it was traced with."""
    cfg, vae = _vae(digits, warmup_epochs=1.0, num_particles=K)
    weight = KLWeight(1.0, warmup_epochs=1.0)
    step = TrainingStep(vae, cfg, weight)
    assert type(step.elbo).__name__ == "JitTrace_ELBO" and step.extra == (weight.tensor,)
    x = digits.train[:16]
    losses = {}
    for t in (0.0, 1.0):  # traced at beta = 0 first
        weight.update(t)
        losses[t] = step.loss_and_grads(x)
    rate = -log_weights(vae, x, K).mean(0).sum().item() - losses[0.0]  # sum_n KL(q(z|x_n) || p(z)), roughly
    assert rate > 1.0
    assert losses[1.0] - losses[0.0] == pytest.approx(rate, rel=0.1)


def test_which_runs_compile(digits, tmp_path):
    assert TRACEABLE == set(PRIORS) - {"flow", "vmf"}  # vmf's normaliser goes through scipy
    normal, flow = build_prior("normal", 2), build_prior("flow", 2)
    cauchy = build_prior(lambda d: pyro.distributions.Cauchy(torch.zeros(d), 1.0).to_event(1), 2)
    assert why_not_compiled(tiny_config(), normal) is None
    assert why_not_compiled(tiny_config(objective="analytic"), normal) is None
    assert "--no-jit" in why_not_compiled(tiny_config(jit=False), normal)
    assert "iwae" in why_not_compiled(tiny_config(objective="iwae"), normal)
    assert "flow" in why_not_compiled(tiny_config(prior="flow"), flow)
    assert "not one the tracer" in why_not_compiled(tiny_config(prior="my_priors:cauchy"), cauchy)
    with pytest.raises(PyroVAEError, match="no compiled version"):
        make_elbo("iwae", 4, jit=True)
    compiled = train(tiny_config(epochs=1, elbo="pyro"), tmp_path / "c", data=digits, progress=False)
    assert compiled.info["elbo"] == "JitTrace_ELBO" and compiled.info["compiled"]
    assert compiled.info["compiler"] == "torch.jit" and "not_direct_because" not in compiled.info
    flow = train(tiny_config(epochs=1, prior="flow", elbo="pyro"), tmp_path / "f", data=digits, progress=False)
    assert flow.info["elbo"] == "Trace_ELBO" and not flow.info["compiled"]
    assert "flow" in flow.info["not_compiled_because"]


@pytest.mark.parametrize("objective,prior", [("trace", "normal"), ("analytic", "normal"), ("trace", "mog-enum")])
def test_compiled_elbo_is_traced_once(objective, prior, digits, monkeypatch):
    """Tracing is the expensive part; an ELBO that traces again each step is slower than none."""
    traces = []
    trace = torch.jit.trace
    monkeypatch.setattr(torch.jit, "trace", lambda *a, **k: traces.append(1) or trace(*a, **k))
    cfg, vae = _vae(digits, prior=prior, objective=objective)
    step = TrainingStep(vae, cfg, KLWeight(1.0))
    for n in (32, 32, 32, 9):
        step.step(digits.train[:n])
    assert len(traces) == 1, type(step.elbo).__name__


def test_a_model_the_tracer_cannot_follow_trains_uncompiled(digits, tmp_path, monkeypatch):
    """The spline flow breaks the traced graph on its second run; were it marked traceable, training
    would still go on, with the Python ELBO, and say why."""
    monkeypatch.setattr(FlowPrior, "traceable", True)
    run = train(tiny_config(epochs=2, prior="flow", elbo="pyro"), tmp_path / "f", data=digits, progress=False)
    assert run.info["elbo"] == "Trace_ELBO" and not run.info["compiled"]
    assert run.info["not_compiled_because"].startswith("torch.jit could not compile it")
    assert run.history[-1]["valid_elbo"] > run.history[0]["valid_elbo"]
