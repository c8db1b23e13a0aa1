"""The linear-Gaussian VAE (probabilistic PCA / factor analysis), whose posterior and evidence are exact:
the tests' closed-form oracle. Nothing in training or the command line uses it; the tests hold the
NUTS sampler, the gap estimators, the log-likelihood estimator and the aggregate-posterior metrics
against its closed forms.

The model, written as an ordinary :class:`~pyro_vae.models.vae.VAE`::

    z ~ N(0, I_d)                         (prior, StandardNormal)
    x | z ~ N(W z + b, Psi),  Psi = diag(sigma^2)     (decoder nn.Linear(d, D), IdentityGaussian likelihood)
    q(z | x) = N(mu(x), diag s(x)^2)      (AmortizedNormal with an nn.Linear(D, 2d) encoder)

With ``Lambda = I + W^T Psi^{-1} W`` (the posterior precision, the same for every x):

    exact posterior     p(z | x) = N(m(x), S),   S = Lambda^{-1},   m(x) = S W^T Psi^{-1} (x - b)
    exact evidence      log p(x) = log N(x; b, C),  C = W W^T + Psi

For a diagonal Gaussian q = N(mu, diag s^2):

    KL(q || p(z | x)) = 1/2 [tr(Lambda diag s^2) + (mu - m)^T Lambda (mu - m) - d - sum log s^2 - log det Lambda]
    ELBO(q)           = log p(x) - KL(q || p(z | x))

and the best such q (the mean-field optimum) is q*(z | x) = N(m(x), diag(1 / Lambda_ii)), whose gap

    log p(x) - ELBO(q*) = 1/2 [sum_i log Lambda_ii - log det Lambda]

does not depend on x (it is 0 exactly when Lambda is diagonal, i.e. W^T Psi^{-1} W is). Since m(x) is
linear in x, an amortized *linear* encoder can represent q* for every x at once: with
:func:`set_optimal_encoder` the amortization gap is zero and only the approximation gap remains.

These closed forms are the ground truth that the MCMC and gap estimators are tested against. All
computations run in float64 and return tensors of the VAE's dtype unless said otherwise.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn

from ..errors import PyroVAEError
from .guides import AmortizedNormal
from .priors import StandardNormal
from .vae import VAE


class IdentityGaussian(nn.Module):
    """x_d ~ N(f_d(z), sigma_d^2) with the decoder output as the mean (no squashing) and a fixed sigma.

    ``sigma``: a positive number or a tensor of shape (D,). Unlike
    :class:`~pyro_vae.models.likelihoods.Gaussian` (sigmoid mean, learned scale), this keeps the
    model linear-Gaussian when the decoder is linear."""

    requires_binary = False

    def __init__(self, sigma, data_dim: int | None = None):
        super().__init__()
        sigma = torch.as_tensor(sigma, dtype=torch.get_default_dtype())
        if data_dim is not None and sigma.dim() == 0:
            sigma = sigma.expand(data_dim).clone()
        if not bool((sigma > 0).all()):
            raise PyroVAEError(f"sigma must be > 0, got {sigma}")
        self.register_buffer("sigma", sigma)

    def forward(self, mean: torch.Tensor) -> dist.Distribution:
        return dist.Normal(mean, self.sigma.expand(mean.shape[-1:])).to_event(1)


def build_linear_gaussian_vae(data_dim: int, latent_dim: int, sigma=0.5, weight: torch.Tensor | None = None,
                              bias: torch.Tensor | None = None, image_shape=None) -> VAE:
    """A :class:`VAE` with prior N(0, I), decoder x = W z + b (``nn.Linear``), likelihood N(Wz + b, sigma^2 I)
    and an amortized linear Normal guide.

    ``weight`` (D, d) and ``bias`` (D,) set W and b (default: PyTorch's initialisation);
    ``image_shape`` defaults to (1, D), for the image figures."""
    if data_dim < 1 or latent_dim < 1:
        raise PyroVAEError(f"data_dim and latent_dim must be >= 1, got {data_dim} and {latent_dim}")
    decoder = nn.Linear(latent_dim, data_dim)
    with torch.no_grad():
        if weight is not None:
            if tuple(weight.shape) != (data_dim, latent_dim):
                raise PyroVAEError(f"weight must have shape ({data_dim}, {latent_dim}), got {tuple(weight.shape)}")
            decoder.weight.copy_(weight)
        if bias is not None:
            if tuple(bias.shape) != (data_dim,):
                raise PyroVAEError(f"bias must have shape ({data_dim},), got {tuple(bias.shape)}")
            decoder.bias.copy_(bias)
    guide = AmortizedNormal(nn.Linear(data_dim, 2 * latent_dim), latent_dim)
    return VAE(StandardNormal(latent_dim), guide, decoder, IdentityGaussian(sigma, data_dim), latent_dim,
               image_shape if image_shape is not None else (1, data_dim))


def linear_gaussian_parts(vae: VAE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W (D, d), b (D,), sigma^2 (D,)) in float64, after checking that the VAE is linear-Gaussian:
    an ``nn.Linear`` decoder, an :class:`IdentityGaussian` likelihood and a N(0, I) prior."""
    if not isinstance(vae.decoder, nn.Linear) or not isinstance(vae.likelihood, IdentityGaussian):
        raise PyroVAEError("the closed forms need a linear-Gaussian VAE: an nn.Linear decoder and an "
                           "IdentityGaussian likelihood (see build_linear_gaussian_vae)")
    prior = vae.prior()
    base = getattr(prior, "base_dist", prior)
    if not (isinstance(base, dist.Normal) and bool((base.loc == 0).all()) and bool((base.scale == 1).all())):
        raise PyroVAEError("the closed forms need the N(0, I) prior")
    w = vae.decoder.weight.detach().double()
    b = vae.decoder.bias.detach().double() if vae.decoder.bias is not None else torch.zeros_like(w[:, 0])
    var = vae.likelihood.sigma.detach().double().expand(w.shape[0]) ** 2
    return w, b, var


def posterior_precision(vae: VAE) -> torch.Tensor:
    """Lambda = I + W^T Psi^{-1} W, shape (d, d), float64."""
    w, _, var = linear_gaussian_parts(vae)
    return torch.eye(w.shape[1], dtype=w.dtype, device=w.device) + w.T @ (w / var[:, None])


def posterior_moments(vae: VAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact posterior's mean m(x) (N, d) and covariance S (d, d), both float64."""
    w, b, var = linear_gaussian_parts(vae)
    cov = torch.linalg.inv(posterior_precision(vae))
    cov = 0.5 * (cov + cov.T)
    mean = (x.double() - b) @ (w / var[:, None]) @ cov  # rows: S W^T Psi^{-1} (x_n - b)  (S symmetric)
    return mean, cov


def exact_posterior(vae: VAE, x: torch.Tensor) -> dist.MultivariateNormal:
    """p(z | x) = N(m(x), S): batch shape (N,), event shape (d,), in x's dtype."""
    mean, cov = posterior_moments(vae, x)
    return dist.MultivariateNormal(mean.to(x.dtype), covariance_matrix=cov.to(x.dtype).expand(len(x), -1, -1))


def exact_log_marginal(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    """log p(x) = log N(x; b, W W^T + Psi) of each row of x, shape (N,), float64."""
    w, b, var = linear_gaussian_parts(vae)
    cov = w @ w.T + torch.diag(var)
    return dist.MultivariateNormal(b, covariance_matrix=cov).log_prob(x.double())


def kl_to_posterior(vae: VAE, x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """KL(N(loc, diag scale^2) || p(z | x)) for each row, shape (N,), float64 (see the module docstring)."""
    precision = posterior_precision(vae)
    mean, _ = posterior_moments(vae, x)
    loc, var = loc.double(), scale.double() ** 2
    diff = loc - mean
    trace = (torch.diagonal(precision) * var).sum(-1)
    quad = ((diff @ precision) * diff).sum(-1)
    d = precision.shape[0]
    return 0.5 * (trace + quad - d - torch.log(var).sum(-1) - torch.logdet(precision))


def gaussian_elbo(vae: VAE, x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The exact ELBO of q = N(loc, diag scale^2) for each row of x: log p(x) - KL(q || p(z | x)), float64."""
    return exact_log_marginal(vae, x) - kl_to_posterior(vae, x, loc, scale)


def optimal_mean_field(vae: VAE, x: torch.Tensor) -> dist.Independent:
    """The diagonal Gaussian with the highest ELBO: N(m(x), diag(1 / Lambda_ii)), in x's dtype."""
    mean, _ = posterior_moments(vae, x)
    scale = torch.diagonal(posterior_precision(vae)).rsqrt()
    return dist.Normal(mean.to(x.dtype), scale.to(x.dtype).expand_as(mean)).to_event(1)


def mean_field_gap(vae: VAE) -> float:
    """log p(x) - ELBO(q*) = 1/2 (sum_i log Lambda_ii - log det Lambda) in nats, the same for every x:
    the approximation gap of the best diagonal Gaussian."""
    precision = posterior_precision(vae)
    return 0.5 * (torch.log(torch.diagonal(precision)).sum() - torch.logdet(precision)).item()


@torch.no_grad()
def set_optimal_encoder(vae: VAE) -> VAE:
    """Set the linear encoder so that q(z | x) is the mean-field optimum :func:`optimal_mean_field` for
    every x: the amortization gap becomes 0. The guide must be an :class:`AmortizedNormal` on R^d with
    an ``nn.Linear`` encoder giving (mean, s) with scale = min_scale + softplus(s). Checked on the way
    out. Returns the VAE, changed in place."""
    guide = vae.guide_dist
    if not isinstance(guide, AmortizedNormal) or not isinstance(guide.encoder, nn.Linear):
        raise PyroVAEError("set_optimal_encoder needs an AmortizedNormal guide with an nn.Linear encoder")
    w, b, var = linear_gaussian_parts(vae)
    d = w.shape[1]
    precision = posterior_precision(vae)
    gain = torch.linalg.inv(precision) @ (w / var[:, None]).T  # (d, D): m(x) = gain (x - b)
    scale = torch.diagonal(precision).rsqrt()
    enc = guide.encoder
    enc.weight.zero_()
    enc.weight[:d].copy_(gain)
    enc.bias[:d].copy_(-gain @ b)
    # the guide's scale is min_scale + softplus(s): find min_scale from the guide itself (s = 0 gives
    # min_scale + log 2), then invert the softplus
    enc.bias[d:].zero_()
    probe = torch.zeros(1, enc.in_features, dtype=enc.weight.dtype, device=enc.weight.device)
    min_scale = guide(probe).base_dist.scale[0, 0].double() - math.log(2.0)
    raw = scale - min_scale
    enc.bias[d:].copy_(raw + torch.log(-torch.expm1(-raw)))  # softplus^{-1}
    q, best = guide(probe), optimal_mean_field(vae, probe)
    if not (torch.allclose(q.base_dist.loc, best.base_dist.loc, atol=1e-4)
            and torch.allclose(q.base_dist.scale, best.base_dist.scale, rtol=1e-4)):
        raise PyroVAEError("set_optimal_encoder: this guide does not parametrise its scale as min_scale + softplus")
    return vae


__all__ = ["IdentityGaussian", "build_linear_gaussian_vae", "linear_gaussian_parts", "posterior_precision",
           "posterior_moments", "exact_posterior", "exact_log_marginal", "kl_to_posterior", "gaussian_elbo",
           "optimal_mean_field", "mean_field_gap", "set_optimal_encoder"]
