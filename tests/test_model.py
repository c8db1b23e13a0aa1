"""The Pyro model and guide: sites, shapes, and the estimators built on their traces."""

import warnings

import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.poutine.util import site_is_subsample

from pyro_vae import Config, build_vae, elbo_per_datapoint, iw_log_likelihood
from pyro_vae.inference.metrics import log_weights

from conftest import tiny_config


def _vae(likelihood="auto", network="mlp", shape=(8, 8), binary=False, latent_dim=3):
    cfg = tiny_config(likelihood=likelihood, network=network, latent_dim=latent_dim)
    dim = shape[0] * shape[1]
    return build_vae(cfg, dim, shape, binary)


@pytest.mark.parametrize(
    "likelihood,network,shape,binary",
    [
        ("bernoulli", "mlp", (8, 8), True),
        ("continuous-bernoulli", "mlp", (8, 8), False),
        ("gaussian", "mlp", (8, 8), False),
        ("bernoulli", "conv", (28, 28), True),
    ],
)
def test_model_and_guide_agree_on_sites(likelihood, network, shape, binary):
    vae = _vae(likelihood, network, shape, binary)
    x = torch.rand(5, shape[0] * shape[1])
    if binary:
        x = torch.bernoulli(x)
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    guide_sites = {n for n, s in guide_trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}
    model_sites = {n for n, s in model_trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}
    assert guide_sites == {"z"}
    assert model_sites == {"z", "x"}
    assert model_trace.nodes["x"]["is_observed"]
    assert model_trace.nodes["z"]["value"] is guide_trace.nodes["z"]["value"]
    assert model_trace.nodes["z"]["fn"].event_shape == (3,)
    # Pyro's own validation (on via conftest) warns about any mismatch; make that an error.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = Trace_ELBO().loss(vae.model, vae.guide, x)
    assert torch.isfinite(torch.tensor(loss))


def test_vectorized_log_weights_have_particle_and_data_dims():
    vae = _vae()
    x = torch.rand(7, 64)
    w = log_weights(vae, x, num_particles=11)
    assert w.shape == (11, 7)
    assert torch.isfinite(w).all()
    # the particles are distinct draws, not one draw broadcast
    assert w.std(0).min() > 0


def test_importance_weighted_bound_is_above_the_elbo():
    torch.manual_seed(0)
    vae = _vae()
    x = torch.rand(50, 64)
    elbo = elbo_per_datapoint(vae, x, num_particles=200).mean()
    iw = iw_log_likelihood(vae, x, num_particles=200).mean()
    assert iw > elbo


def test_config_round_trips_through_json():
    cfg = Config(latent_dim=7, beta=0.5, binarize=True, data_root="/x")
    assert Config.from_json(cfg.to_json()) == cfg


def test_bernoulli_pixels_is_bernoulli_to_event():
    """The one-pass Bernoulli likelihood has Bernoulli(logits).to_event(1)'s density, shapes and draws,
    with x broadcast against particles of z."""
    import pyro.distributions as dist

    from pyro_vae.models.likelihoods import BernoulliPixels

    logits = torch.randn(6, 4, 10)  # (particles, batch, pixels)
    x = torch.bernoulli(torch.rand(4, 10))
    ours, reference = BernoulliPixels(logits), dist.Bernoulli(logits=logits).to_event(1)
    assert torch.allclose(ours.log_prob(x), reference.log_prob(x), atol=1e-5)
    assert (ours.batch_shape, ours.event_shape) == (reference.batch_shape, reference.event_shape)
    assert torch.allclose(ours.mean, reference.mean)
    expanded = BernoulliPixels(logits[0]).expand((3, 4))
    assert isinstance(expanded, BernoulliPixels) and expanded.batch_shape == (3, 4)
    assert torch.allclose(expanded.log_prob(x), reference.log_prob(x)[0].expand(3, 4), atol=1e-5)
    torch.manual_seed(0)
    draws = BernoulliPixels(logits).sample((2000,))
    assert draws.shape == (2000, 6, 4, 10)
    assert (draws.mean(0) - torch.sigmoid(logits)).abs().max() < 0.06
    with pytest.raises(ValueError, match="support"):
        BernoulliPixels(logits, validate_args=True).log_prob(x * 0.5)


def test_moving_a_vae_moves_the_guide_bijection():
    """biject_to(interval) holds the prior's bounds as tensors outside the module tree; .to() must
    reach them (checked with a dtype change, the CPU stand-in for a device change)."""
    from torch.distributions.transforms import AffineTransform

    digits_dim, shape = 64, (8, 8)
    vae = build_vae(Config(prior="uniform", latent_dim=3), digits_dim, shape, False).to(torch.float64)

    def affine_parts(t):
        if isinstance(t, AffineTransform):
            return [t]
        parts = list(getattr(t, "parts", ())) + [getattr(t, "base_transform", None)]
        return [a for p in parts if p is not None for a in affine_parts(p)]

    (affine,) = affine_parts(vae.guide_dist.transform)
    assert affine.loc.dtype == affine.scale.dtype == torch.float64
    z = vae.guide_dist(torch.rand(5, digits_dim, dtype=torch.float64)).rsample()
    assert z.dtype == torch.float64 and z.abs().max() < 3 ** 0.5
