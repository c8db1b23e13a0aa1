"""Estimators of how well a trained VAE fits, per data point.

With K draws z_k ~ q(z | x) and log-weights  w_k = log p(x, z_k) - log q(z_k | x):

    ELBO(x)   ~ (1/K) sum_k w_k
    log p(x) >= log (1/K) sum_k exp(w_k)          (importance weighted; tight as K -> inf)
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from ..numerics import logsumexp
from .direct import direct_log_weights, why_not_direct


@torch.no_grad()
def log_weights(vae, x: torch.Tensor, num_particles: int) -> torch.Tensor:
    """w_k(x_n) = log p(x_n, z_k) - log q(z_k | x_n) for z_k ~ q(z | x_n): shape (K, N). Computed from the
    model's distributions (:func:`~pyro_vae.inference.direct.direct_log_weights`) where that applies, else
    from Pyro's traces (:func:`trace_log_weights`); the two draw the same z on the same random stream."""
    return log_weights_function(vae)(vae, x, num_particles)


def log_weights_function(vae):
    """:func:`~pyro_vae.inference.direct.direct_log_weights` or :func:`trace_log_weights`, whichever
    :func:`log_weights` uses for ``vae`` (decided once, for a loop over batches)."""
    return direct_log_weights if why_not_direct(vae) is None else trace_log_weights


@torch.no_grad()
def trace_log_weights(vae, x: torch.Tensor, num_particles: int) -> torch.Tensor:
    """:func:`log_weights` through Pyro: the guide traced, the model replayed against it, every sample
    site's log-density summed (model +, guide -)."""
    with pyro.plate("particles", num_particles, dim=-2):
        guide_trace = poutine.trace(vae.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    log_w = 0.0
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        trace.compute_log_prob()
        for site in trace.nodes.values():
            if site["type"] == "sample" and not site_is_subsample(site):
                log_w = log_w + sign * site["log_prob"]
    return log_w.expand(num_particles, x.shape[0])


def _batched(fn, x: torch.Tensor, batch_size: int, progress: bool = False, desc: str = "") -> torch.Tensor:
    from .tracking import bar as _bar

    starts = range(0, x.shape[0], batch_size)
    return torch.cat([fn(x[i : i + batch_size]) for i in _bar(starts, enabled=progress, desc=desc, leave=False,
                                                               unit="batch", dynamic_ncols=True)])


@torch.no_grad()
def elbo_per_datapoint(vae, x: torch.Tensor, num_particles: int = 1, batch_size: int = 1000) -> torch.Tensor:
    """The Monte Carlo ELBO of each data point, shape (N,), in nats."""
    weights = log_weights_function(vae)
    return _batched(lambda xb: weights(vae, xb, num_particles).mean(0), x, batch_size)


@torch.no_grad()
def iw_log_likelihood(vae, x: torch.Tensor, num_particles: int = 1000, batch_size: int | None = None,
                      progress: bool = False) -> torch.Tensor:
    """The importance-weighted estimate of log p(x) of each data point, shape (N,). ``batch_size`` data
    points at a time (default :func:`iw_batch_size`: memory bounded whatever K is)."""
    batch_size = batch_size or iw_batch_size(vae, num_particles)
    weights = log_weights_function(vae)
    return _batched(
        lambda xb: logsumexp(weights(vae, xb, num_particles), 0) - math.log(num_particles),
        x, batch_size, progress, f"log p(x), K={num_particles}",
    )


def iw_batch_size(vae, num_particles: int, budget: int = 20_000_000) -> int:
    """Data points per batch such that the largest tensors of an importance-weighted evaluation, K
    particles x batch x (pixels, the widest hidden layer, mixture components), stay near ``budget``
    numbers (80 MB in float32): K = 5000 runs in the same memory as K = 100."""
    widths = [vae.data_dim] + [p.shape[0] for p in vae.decoder.parameters() if p.dim() == 1]
    with torch.no_grad():
        prior = vae.prior()
    components = getattr(prior, "num_components", None)
    if components is None and isinstance(prior, torch.distributions.MixtureSameFamily):
        components = prior.mixture_distribution.logits.shape[-1] * vae.latent_dim
    width = max(widths) + (components or 0)
    return max(1, budget // (num_particles * width))


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    """The mean over data points and its standard error."""
    values = values.double()
    n = values.numel()
    stderr = values.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return values.mean().item(), stderr


# --------------------------------------------------------------------------- rate and distortion


def _kl_closed_form(q, p) -> torch.Tensor | None:
    try:
        return torch.distributions.kl_divergence(q, p)
    except NotImplementedError:
        return None


@torch.no_grad()
def rate_and_distortion(vae, x: torch.Tensor, num_particles: int = 16, batch_size: int = 500) -> dict:
    """Per data point: rate KL(q(z|x) || p(z)) (closed form where registered, else Monte Carlo with
    ``num_particles`` draws) and distortion -E_q log p(x | z). Returns tensors of shape (N,) and
    ``rate_closed_form`` telling which estimator ran."""
    rates, distortions, closed = [], [], True
    prior = vae.prior()
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size]
        q = vae.guide_dist(xb)
        z = q.sample((num_particles,))  # (K, n, d)
        distortions.append(-vae.likelihood(vae.decoder(z)).log_prob(xb).mean(0))
        kl = _kl_closed_form(q, prior)
        if kl is None:
            closed = False
            kl = (q.log_prob(z) - prior.log_prob(z)).mean(0)
        rates.append(kl.expand(xb.shape[0]))
    return {"rate": torch.cat(rates), "distortion": torch.cat(distortions), "rate_closed_form": closed}


@torch.no_grad()
def posterior_means(vae, x: torch.Tensor, num_particles: int = 64, batch_size: int = 1000) -> torch.Tensor:
    """E_q[z | x] for each x: exact where the guide has a mean, else a Monte Carlo average."""
    out = []
    for i in range(0, x.shape[0], batch_size):
        q = vae.guide_dist(x[i : i + batch_size])
        try:
            mean = q.mean
        except NotImplementedError:
            mean = q.sample((num_particles,)).mean(0)
        out.append(mean)
    return torch.cat(out)


def active_units(vae, x: torch.Tensor, threshold: float = 0.01) -> dict:
    """Burda et al. (2016): unit i is active when Cov_x(E_q[z_i | x]) > threshold."""
    means = posterior_means(vae, x)
    variances = means.var(0)
    return {"active_units": int((variances > threshold).sum()), "unit_variances": variances.tolist()}


# --------------------------------------------------------------------------- the aggregate posterior


def has_fast_aggregate(vae, x: torch.Tensor) -> bool:
    """Whether the aggregate posterior of ``vae``'s guide is computed by matrix products (a diagonal Normal
    guide, or the power spherical): for others each q(z | x_n) is evaluated at each z, which costs far more."""
    from ..models.mixtures import diagonal_normal
    from ..models.sphere import PowerSpherical

    with torch.no_grad():
        q = vae.guide_dist(x[:1])
    return isinstance(q, PowerSpherical) or diagonal_normal(q) is not None


@torch.no_grad()
def _log_q_aggregate(vae, z: torch.Tensor, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """log q(z) = log (1/N) sum_n q(z | x_n) for each row of z (shape (M,)), the mixture over all x: for a
    diagonal Normal guide a :class:`~pyro_vae.models.mixtures.DiagonalNormalMixture` (matrix products),
    else each q(z | x_n) evaluated in chunks of z."""
    from ..models.mixtures import DiagonalNormalMixture, diagonal_normal

    q = vae.guide_dist(x)  # batch (N,)
    base = diagonal_normal(q)
    if base is not None:
        mixture = DiagonalNormalMixture(torch.zeros(x.shape[0], device=x.device), base.loc, base.scale,
                                        compute_dtype=torch.float64)
        return torch.cat([mixture.log_prob(z[i : i + 4 * chunk]) for i in range(0, z.shape[0], 4 * chunk)])
    from ..models.sphere import PowerSpherical, _EPS

    if isinstance(q, PowerSpherical):  # log q(z | x_n) = log C(kappa_n) + kappa_n log(1 + mu_n . z): one GEMM
        loc, kappa = q.loc.double(), q.concentration.double()
        log_c = q.log_normalizer().double()
        out = []
        for i in range(0, z.shape[0], chunk):
            cos = (z[i : i + chunk].double() @ loc.T).clamp_min(-1 + _EPS)
            out.append(logsumexp(log_c + kappa * torch.log1p(cos), dim=1) - math.log(x.shape[0]))
        return torch.cat(out).to(z.dtype)
    out = []
    rows = max(1, min(chunk, 20_000_000 // max(1, x.shape[0] * z.shape[-1])))  # (rows, N, d) at most 80 MB
    for i in range(0, z.shape[0], rows):
        lp = q.log_prob(z[i : i + rows, None, :])  # (m, N)
        out.append(logsumexp(lp, dim=1) - math.log(x.shape[0]))
    return torch.cat(out)


@torch.no_grad()
def aggregate_posterior(vae, x: torch.Tensor, num_prior_samples: int = 5000, hole_percentile: float = 1.0) -> dict:
    """ELBO surgery (Hoffman & Johnson 2016) on the aggregate posterior q(z) = (1/N) sum_n q(z | x_n):

        rate = E_x KL(q(z|x) || p(z)) = I(x; z) + KL(q(z) || p(z))

    with z_n ~ q(z | x_n), one draw per data point:
        I(x; z)         ~ mean_n [log q(z_n | x_n) - log q(z_n)]      (<= log N)
        KL(q(z) || p(z)) ~ mean_n [log q(z_n) - log p(z_n)]
    Prior holes: the share of z ~ p(z) where log q(z) falls below the ``hole_percentile``-th
    percentile of log q at the posterior draws z_n, i.e. prior mass where no data point encodes."""
    q = vae.guide_dist(x)
    prior = vae.prior()
    z = q.sample()  # (N, d), one per data point
    log_q_cond = q.log_prob(z)
    log_q_agg = _log_q_aggregate(vae, z, x)
    log_p = prior.log_prob(z)
    mi_terms = log_q_cond - log_q_agg
    kl_terms = log_q_agg - log_p
    z_prior = prior.sample((num_prior_samples,))
    threshold = torch.quantile(log_q_agg, hole_percentile / 100)
    holes = (_log_q_aggregate(vae, z_prior, x) < threshold).double()
    return {
        "mutual_information": mean_and_stderr(mi_terms),
        "marginal_kl": mean_and_stderr(kl_terms),
        "rate_from_surgery": mean_and_stderr(mi_terms + kl_terms),
        "mutual_information_bound": math.log(x.shape[0]),
        "hole_score": mean_and_stderr(holes),
        "num_points": x.shape[0],
    }


# --------------------------------------------------------------------------- blur


def gradient_energy(images: torch.Tensor, image_shape) -> torch.Tensor:
    """Mean squared finite difference between neighbouring pixels of each image, shape (N,)."""
    img = images.reshape(-1, *image_shape).double()
    dx = (img[:, :, 1:] - img[:, :, :-1]).pow(2).mean((1, 2))
    dy = (img[:, 1:, :] - img[:, :-1, :]).pow(2).mean((1, 2))
    return dx + dy


def sharpness_ratio(images: torch.Tensor, reference: torch.Tensor, image_shape) -> float:
    """Mean gradient energy of ``images`` over that of real ``reference`` images (1.0 = as sharp as the data)."""
    return (gradient_energy(images, image_shape).mean() / gradient_energy(reference, image_shape).mean()).item()


# --------------------------------------------------------------------------- ex-post density estimation


class ExPostMixture:
    """Ghosh et al. (2020): fit a Gaussian mixture to posterior means of the training data and
    sample z from it instead of from the prior."""

    def __init__(self, vae, x: torch.Tensor, components: int = 10, seed: int = 0):
        from sklearn.mixture import GaussianMixture

        z = posterior_means(vae, x).cpu().double().numpy()
        self.gmm = GaussianMixture(n_components=min(components, len(z)), covariance_type="full",
                                   random_state=seed, reg_covar=1e-5).fit(z)
        self.device = x.device
        with torch.no_grad():
            self.sphere = vae.prior().support is pyro.distributions.constraints.sphere

    def sample(self, n: int) -> torch.Tensor:
        """n draws of the fitted mixture; on a spherical latent space projected onto the sphere (the
        mixture is fitted to posterior means, which lie inside the ball)."""
        z, _ = self.gmm.sample(n)
        z = torch.as_tensor(z, dtype=torch.float32, device=self.device)
        return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12) if self.sphere else z


# --------------------------------------------------------------------------- what the prior costs


@torch.no_grad()
def prior_gap(vae, x: torch.Tensor, train_x: torch.Tensor, num_particles: int = 4, batch_size: int = 500) -> dict:
    """The held-out prior gap: the ELBO with the prior replaced by the aggregate posterior of the training
    images, q(z) = (1/N) sum_n q(z | x_n) (all N of them), minus the ELBO with the run's own prior. q(z)
    maximises E_x E_q(z|x) log p(z) over all priors p for a fixed encoder, the x being the N images it is
    made of (Hoffman & Johnson 2016, the VampPrior paper's motivation); on test images it need not, and
    where the posteriors are narrow it does not: binarized MNIST at d = 40 gives -25 to -31 nats for every
    prior (the empirical q(z) overfits: a test code falls between the training images' components), the
    8x8 digits at d = 2 and 8 give +0.1 to +1.3. The difference per test point,

        gap(x) = E_{z ~ q(z|x)} [log q(z) - log p(z)],

    is estimated with ``num_particles`` draws per test point (the same draws for both ELBOs, so the
    reconstruction and entropy terms cancel). The training images' own q(z|x_n) are the components: the
    test points are not among them, so q(z) is a held-out prior. Returns the mean gap in nats with its
    standard error over test points, and N."""
    gaps = []
    prior = vae.prior()
    for i in range(0, x.shape[0], batch_size):
        q = vae.guide_dist(x[i : i + batch_size])
        z = q.sample((num_particles,))  # (S, n, d)
        flat = z.reshape(-1, z.shape[-1])
        diff = _log_q_aggregate(vae, flat, train_x) - prior.log_prob(flat).double()
        gaps.append(diff.reshape(num_particles, -1).mean(0))
    gap = torch.cat(gaps)
    return {"gap": mean_and_stderr(gap), "num_train_points": train_x.shape[0], "num_particles": num_particles,
            "aggregate_of": "all training images"}


@torch.no_grad()
def components_in_use(vae, x: torch.Tensor) -> dict | None:
    """For a mixture prior p(z) = sum_k w_k p_k(z): how many of its K components the codes use. With one
    draw z_n ~ q(z | x_n) per point and responsibilities r_nk = w_k p_k(z_n) / p(z_n), the usage is
    u_k = (1/N) sum_n r_nk and its effective number exp(H(u)) (K when the codes spread over all components
    evenly, 1 when one component explains every code); the weights' effective number exp(H(w)) beside it.
    None for a prior that is not a mixture."""
    from ..models.mixtures import DiagonalNormalMixture, effective_number

    prior = vae.prior()
    z = vae.guide_dist(x).sample()
    if isinstance(prior, DiagonalNormalMixture):
        log_r = prior.component_log_prob(z)
        weights = torch.softmax(prior.logits, -1)
    elif isinstance(prior, torch.distributions.MixtureSameFamily):
        weights = prior.mixture_distribution.probs
        log_r = prior.component_distribution.log_prob(z.unsqueeze(-2)) + weights.log()
    else:
        return None
    usage = torch.softmax(log_r.double(), -1).mean(0)
    k = usage.numel()
    return {"num_components": k, "components_in_use": effective_number(usage),
            "weights_effective_number": effective_number(weights), "largest_weight": float(weights.max()),
            "most_responsible_distinct": int(log_r.argmax(-1).unique().numel()), "num_points": x.shape[0]}


def parameter_counts(vae) -> dict:
    """The model's parameters by part: encoder (the guide's networks), decoder, prior (its own: the
    VampPrior's pseudo-inputs, a mixture's means, scales and weights, a flow's layers) and likelihood."""
    parts = {"encoder": vae.guide_dist, "decoder": vae.decoder, "prior": vae.prior, "likelihood": vae.likelihood}
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    counts["total"] = sum(counts.values())
    return counts
