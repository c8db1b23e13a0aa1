"""Mixture priors: a learned mixture of Gaussians (marginal or with its component enumerated) and the
VampPrior, a mixture of the encoder's own posteriors at learned pseudo-inputs; and
:class:`DiagonalNormalMixture`, their density computed at the cost of its arithmetic.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch.distributions.utils import lazy_property
from torch import nn

from ..config import Config
from ..errors import PyroVAEError
from ..numerics import HALF_LOG_2PI, first_order, logsumexp, logsumexp_terms
from .base import Prior

_DEFAULTS = Config()


class DiagonalNormalMixture(dist.TorchDistribution):
    """p(z) = sum_k w_k N(z; mu_k, diag s_k^2), K components in R^d, w = softmax(logits): the density of
    ``MixtureSameFamily(Categorical(logits), Normal(mu, s).to_event(1))``, computed as a performance
    engineer would. Each component's log-density is a quadratic form in z,

        log N(z; mu_k, s_k) = -1/2 sum_j z_j^2 P_kj + sum_j z_j mu_kj P_kj + c_k,    P_kj = 1 / s_kj^2,
        c_k = -1/2 sum_j mu_kj^2 P_kj - sum_j log s_kj - d/2 log 2 pi,

    so all K of them, for every z at once, are one matrix product, [z, z*z, 1] @ [mu P, -P/2, c]^T, and
    log p(z) = logsumexp_k (log w_k + log N(z; mu_k, s_k)) one reduction (:func:`pyro_vae.numerics.logsumexp`,
    which skips the exponentials that underflow: most of the K, for a given z). The broadcast form costs a
    (batch, K, d) tensor per elementwise operation, forward and backward; this costs one GEMM forward and
    two backward (:class:`_QuadraticForms`).

    Precision: the expansion subtracts terms of size sum_j (z_j^2 + mu_kj^2) P_kj, so in float32 a
    component's log-density carries a rounding error of about 1e-7 times that, where the broadcast form's
    is 1e-7 times the difference itself. Measured at K = 500, d = 40, |z| <= 4, scales >= 0.05 (the
    bounded-logvar guide's floor): about 2e-3 nats at most, against 6e-5 for the broadcast form (tests/
    test_mixtures.py), far below the Monte Carlo error of any ELBO or log p(x) estimate. ``compute_dtype=
    torch.float64`` computes the quadratic form in double precision (about 1.8 times the mixture's cost
    on a CPU)."""

    arg_constraints = {"logits": constraints.real_vector, "loc": constraints.real_vector,
                       "scale": constraints.independent(constraints.positive, 1)}
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor | None = None, validate_args=None,
                 compute_dtype: torch.dtype | None = None, *, log_scale: torch.Tensor | None = None):
        if (scale is None) == (log_scale is None):
            raise ValueError("give the components' scale or their log_scale, not both")
        given = scale if scale is not None else log_scale
        if loc.dim() != 2 or given.shape != loc.shape or logits.shape != loc.shape[:1]:
            raise ValueError(f"expected logits (K,), loc and scale (K, d); got {tuple(logits.shape)}, "
                             f"{tuple(loc.shape)}, {tuple(given.shape)}")
        self.logits, self.loc = logits, loc
        if scale is not None:
            self.scale = scale
        else:  # a learned log-scale (the mixture of Gaussians): no exp and log back on every step
            self.log_scale = log_scale
        self.compute_dtype = compute_dtype
        super().__init__(torch.Size(), loc.shape[-1:], validate_args=validate_args)

    @lazy_property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    @lazy_property
    def log_scale(self) -> torch.Tensor:
        return self.scale.log()

    @property
    def num_components(self) -> int:
        return self.loc.shape[0]

    def component_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log w_k + log N(value; mu_k, s_k) for every component: shape value.shape[:-1] + (K,)."""
        compute = self.compute_dtype or torch.promote_types(value.dtype, self.loc.dtype)
        z, loc, log_scale = value.to(compute), self.loc.to(compute), self.log_scale.to(compute)
        flat = z.reshape(-1, z.shape[-1])
        if torch.compiler.is_compiling():  # the compiler fuses the plain form's elementwise passes itself
            quad = _quadratic_forms(flat, self.logits.to(compute), loc, log_scale)
        else:
            quad = _QuadraticForms.apply(flat, self.logits.to(compute), loc, log_scale)
        return quad.reshape(*value.shape[:-1], self.loc.shape[0])

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return mixture_log_prob(value, self.logits, self.loc, self.log_scale, self.compute_dtype)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            k = dist.Categorical(logits=self.logits).sample(sample_shape)
            return self.loc[k] + self.scale[k] * torch.randn_like(self.loc[k])

    @property
    def mean(self) -> torch.Tensor:
        return (torch.softmax(self.logits, -1)[:, None] * self.loc).sum(0)

    @property
    def variance(self) -> torch.Tensor:
        w = torch.softmax(self.logits, -1)[:, None]
        mean = (w * self.loc).sum(0)
        return (w * (self.scale.pow(2) + self.loc.pow(2))).sum(0) - mean.pow(2)

    def as_mixture_same_family(self) -> dist.MixtureSameFamily:
        """The same distribution as Pyro's MixtureSameFamily (the slow, broadcast form)."""
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits),
                                      dist.Normal(self.loc, self.scale).to_event(1))


def diagonal_normal(q) -> torch.distributions.Normal | None:
    """The Normal of ``q`` when ``q`` is a diagonal Normal over its event, Independent(Normal, 1) (what the
    default guide returns), so that a :class:`DiagonalNormalMixture` can take its batch as components; None
    for any other distribution."""
    base = getattr(q, "base_dist", None)
    if (isinstance(q, torch.distributions.Independent) and isinstance(base, torch.distributions.Normal)
            and q.reinterpreted_batch_ndims == 1):
        return base
    return None


def _quadratic_forms(z, logits, loc, log_scale):
    """The (n, K) component log-densities of the class docstring, written plainly (autograd derives the
    backward pass): const + z @ (mu P)^T - 1/2 (z*z) @ P^T, two GEMMs that accumulate into one output."""
    precision = (-2.0 * log_scale).exp()
    const = (torch.log_softmax(logits, -1) - 0.5 * (loc * loc * precision).sum(-1) - log_scale.sum(-1)
             - loc.shape[-1] * HALF_LOG_2PI)
    return torch.addmm(torch.addmm(const, z, (loc * precision).T), z * z, precision.T, alpha=-0.5)


class _QuadraticForms(torch.autograd.Function):
    """:func:`_quadratic_forms` with its backward pass written out, for eager mode: every elementwise pass
    over the (K, d) parameters and every autograd node costs microseconds to tens of them on a CPU, whatever
    its arithmetic (at K = 500, d = 40, a batch of 100, on this project's 2-core machine: forward and backward
    0.85-0.94 ms here against 1.16-1.19 ms for the plain form under autograd). Here, with
    P = exp(-2 log s), A = mu P, Z = [z, -z*z/2, 1] (n, 2d + 1) and W = [A, P, c] (K, 2d + 1), the forward
    pass is one GEMM, quad = Z W^T, and for an incoming gradient G (n, K), with [g_A, g_P, g_c] = G^T Z (one
    GEMM; g_P the gradient of P's block, g_c = sum_n G),

        d/dz     = (G W)_A - z (G W)_P                                      (one GEMM)
        d/dmu    = P (g_A - g_c mu)
        d/dlog s = -2 A g_A - 2 P g_P + g_c (mu A - 1) = A (g_c mu - 2 g_A) - 2 P g_P - g_c
        d/dlogits = g_c - softmax(logits) sum_k g_c

    (c_k = log_softmax(logits)_k - 1/2 sum_j mu_kj A_kj - sum_j log s_kj - d/2 log 2 pi). Tested against
    Pyro's MixtureSameFamily, values and gradients. Not differentiable twice. The constants ride in the GEMM
    as a last column (Z's of ones, W's c): a bias added by ``addmm`` cost more than that column."""

    @staticmethod
    def forward(ctx, z, logits, loc, log_scale):
        quad, saved = _quadratic_forward(z, logits, loc, log_scale)
        ctx.save_for_backward(*saved)
        return quad

    @staticmethod
    @first_order
    def backward(ctx, grad):
        return _quadratic_backward(grad, *ctx.saved_tensors)


class _MixtureLogProb(torch.autograd.Function):
    """log p(z) = logsumexp_k quad_k(z) in one autograd node: :class:`_QuadraticForms` followed by
    :func:`~pyro_vae.numerics.logsumexp`, whose gradient terms / total (the components' responsibilities)
    is the G that the quadratic forms' backward pass takes.

    G is sparse: logsumexp drops the components more than 43.7 nats (float32) below a z's best, so a
    component that no z of the batch comes near has a column of exact zeros, and its gradients are exactly 0
    (the logits' aside). On a CPU the backward pass finds the components in use (a column sum) and, where they
    are at most half of the K, computes their gradients only: two GEMMs over them and no pass over the other
    components' parameters. In the binarized-MNIST benchmark at K = 500, d = 40, 13 to 31 components served a
    batch of 100 codes after 300 steps (a mixture whose codes use few components per batch, as a collapsed
    one does: metrics.json's ``mixture`` says how many a trained run uses). The same numbers either way, to
    rounding."""

    @staticmethod
    def forward(ctx, z, logits, loc, log_scale):
        quad, saved = _quadratic_forward(z, logits, loc, log_scale)
        out, terms, total = logsumexp_terms(quad, -1, inplace=True)  # (quad is not needed again)
        ctx.save_for_backward(terms, total, *saved)
        return out

    @staticmethod
    @first_order
    def backward(ctx, grad):
        terms, total, *saved = ctx.saved_tensors
        scale = grad.unsqueeze(-1) / total
        if terms.device.type == "cpu":  # (finding the components used costs a device sync elsewhere)
            used = terms.sum(0).nonzero().squeeze(1)  # (any(0) costs 8 times this sum)
            if used.numel() <= terms.shape[1] // 2:
                return _quadratic_backward(terms.index_select(1, used) * scale, *saved, used=used)
        return _quadratic_backward(terms * scale, *saved)


def _quadratic_forward(z, logits, loc, log_scale):
    """(quad (n, K), the tensors the backward pass needs): see :class:`_QuadraticForms`. Each line is one or
    two passes: on a CPU every operation costs microseconds whatever its size, so their number is the cost."""
    n, d = z.shape
    precision = torch.exp(log_scale * -2.0)
    a = loc * precision
    log_weights = torch.log_softmax(logits, -1)
    const = torch.sub(log_weights, torch.addcmul(log_scale, loc, a, value=0.5).sum(-1)).sub_(d * HALF_LOG_2PI)
    w = torch.cat([a, precision, const.unsqueeze(1)], 1)  # (writing each block into a slice of one buffer,
    zz = torch.cat([z, torch.mul(z, z * -0.5), z.new_ones(n, 1)], 1)  # strided, cost more than the cat)
    return zz @ w.T, (zz, w, loc, precision, log_weights)


def _quadratic_backward(grad, zz, w, loc, precision, log_weights, used=None):
    """The gradients (z, logits, loc, log_scale) for an incoming gradient ``grad`` of quad: (n, K), or with
    ``used`` (the indices of the components whose column of it is not all 0) only those columns, (n, len(used));
    then only those components' weight, mean and scale gradients are computed, the others' are 0 (but for the
    logits', -softmax(logits)_k sum_j g_c,j)."""
    d = loc.shape[1]
    if used is not None:
        w, loc_k, precision_k = w.index_select(0, used), loc.index_select(0, used), precision.index_select(0, used)
    else:
        loc_k, precision_k = loc, precision
    g_w = grad.T @ zz                                   # (K, 2d + 1): [g_A, g_P, g_c]
    g_a, g_p, gc = g_w[:, :d], g_w[:, d : 2 * d], g_w[:, 2 * d :]
    g_zw = grad @ w[:, : 2 * d]                         # (n, 2d)
    g_z = torch.addcmul(g_zw[:, :d], zz[:, :d], g_zw[:, d:], value=-1.0)
    t = gc * loc_k
    g_loc = precision_k * (g_a - t)
    g_log_scale = torch.addcmul(w[:, :d] * torch.sub(t, g_a, alpha=2.0), precision_k, g_p, value=-2.0).sub_(gc)
    g_c = gc.squeeze(-1)
    if used is None:
        return g_z, g_c - log_weights.exp() * g_c.sum(), g_loc, g_log_scale
    g_logits = torch.mul(log_weights.exp(), -g_c.sum()).index_add_(0, used, g_c)
    return (g_z, g_logits, torch.zeros_like(loc).index_copy_(0, used, g_loc),
            torch.zeros_like(loc).index_copy_(0, used, g_log_scale))


def mixture_log_prob(value: torch.Tensor, logits: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor,
                     compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """log p(value) of the diagonal Normal mixture (logits (K,), loc and log_scale (K, d)), event dimension
    summed: :meth:`DiagonalNormalMixture.log_prob` without building the distribution."""
    if value.shape[-1:] != loc.shape[-1:] or loc.shape != log_scale.shape or logits.shape != loc.shape[:1]:
        raise ValueError(f"a mixture of {tuple(logits.shape)} weights, means {tuple(loc.shape)} and log-scales "
                         f"{tuple(log_scale.shape)} has no density at a value of shape {tuple(value.shape)}")
    compute = compute_dtype or torch.promote_types(value.dtype, loc.dtype)
    args = [t if t.dtype == compute else t.to(compute) for t in (value.reshape(-1, value.shape[-1]), logits, loc,
                                                                  log_scale)]
    if torch.compiler.is_compiling():  # the compiler fuses the plain form's elementwise passes itself
        out = logsumexp(_quadratic_forms(*args), -1)
    else:
        out = _MixtureLogProb.apply(*args)
    out = out.reshape(value.shape[:-1])
    return out if out.dtype == value.dtype else out.to(value.dtype)


def _mixture_init(components: int, latent_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    means = torch.randn(components, latent_dim, generator=torch.Generator().manual_seed(0))
    return means, torch.full((components, latent_dim), 0.5)


class MixtureOfGaussians(Prior):
    """p(z) = sum_k pi_k N(z; mu_k, diag sigma_k^2), K components, means and scales learned, and the
    weights either learned (pi = softmax(logits), ``weights="learned"``) or fixed and uniform, pi_k = 1/K
    (``weights="uniform"``): the form the VampPrior authors' code gives its mixture priors (``models/VAE.py``
    of jmtomczak/vae_vampprior: log p(z) = logsumexp_k log N(z; mu_k, sigma_k) - log K). ``learnable=False``
    fixes everything (uniform weights, means from a fixed seed, sigma = 0.5).

    Why uniform weights: a component that no code reaches gets no gradient; with learned weights, the
    softmax then moves its weight to the components in use, and on binarized MNIST (K = 500, d = 40) the
    whole mass went to a single component (weight 1.0000): the "mixture" became one learned Gaussian.
    Uniform weights cannot collapse that way, but a dead component then costs log(K / K_used) nats of
    log p(z) everywhere; ``reseed=True`` brings such components back (:meth:`after_epoch`)."""

    traceable = True

    def __init__(self, latent_dim: int, components: int = _DEFAULTS.prior_components,
                 learnable: bool = _DEFAULTS.prior_learnable, weights: str = _DEFAULTS.prior_weights,
                 reseed: bool = _DEFAULTS.prior_reseed):
        super().__init__()
        if weights not in MIXTURE_WEIGHTS:
            raise PyroVAEError(f"unknown mixture weights {weights!r}; choose one of {', '.join(MIXTURE_WEIGHTS)}")
        self.weights, self.reseed = (weights if learnable else "uniform"), reseed
        means, scales = _mixture_init(components, latent_dim)
        tensors = {"logits": torch.zeros(components), "means": means, "log_scales": scales.log()}
        for name, value in tensors.items():
            if learnable and not (name == "logits" and self.weights == "uniform"):
                setattr(self, name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    def component_weights(self) -> dist.Categorical:
        return dist.Categorical(logits=self.logits)

    def components(self) -> dist.Distribution:
        return dist.Normal(self.means, self.log_scales.exp()).to_event(1)

    def forward(self):
        return DiagonalNormalMixture(self.logits, self.means, log_scale=self.log_scales)

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        return mixture_log_prob(z, self.logits, self.means, self.log_scales)

    @torch.no_grad()
    def after_epoch(self, guide: nn.Module, x: torch.Tensor, generator: torch.Generator) -> dict | None:
        """Re-seed the dead components (``reseed=True``): with one draw z_n ~ q(z | x_n) per image of ``x``
        (a random subset of the training set), the usage of component k is u_k = (1/N) sum_n r_nk, r the
        responsibilities; a component with u_k < 1/(10 K), a tenth of its uniform share, is moved to the code
        z_j of a random image of ``x``, with the kernel density estimate's bandwidth as its scale,

            mu_k = z_j,    sigma_kj = (4 / ((d + 2) K))^(1 / (d + 4)) sd_n(z_nj)       (Silverman's rule),

        so that the K components, re-seeded so, are a kernel density estimate of the aggregate posterior
        q(z) = (1/N) sum_n q(z | x_n), the prior that is optimal for the encoder (Hoffman & Johnson 2016),
        and put the dead ones where the codes are now: the VampPrior's reason for encoding its pseudo-inputs,
        applied to free components, and the dead-code restart of k-means and VQ-VAE codebooks. (The
        posterior's own scale sigma(x_j) is no good: in d = 40 a component that narrow explains no other
        code, and the broadest component takes them all.) Returns the count re-seeded and the usage's
        effective number exp(H(u)) before the re-seeding, for the run's history.

        Measured on binarized MNIST (the VampPrior recipe, K = 500, d = 40, uniform weights), the effective
        number of components used by 2,000 random test codes after 8 epochs: 1.00 without re-seeding, 1.51
        re-seeding at sigma(x_j), 359 re-seeding with the bandwidth; the validation ELBO -155.8, -154.7 and
        -138.7 nats."""
        if not self.reseed or not isinstance(self.means, nn.Parameter):
            return None
        q = guide(x)
        if diagonal_normal(q) is None:
            return None  # only a diagonal Normal guide gives a component of the same family
        z = q.sample()
        usage = self().component_log_prob(z).softmax(-1).mean(0)
        used = effective_number(usage)
        dead = (usage < 0.1 / usage.numel()).nonzero().flatten()
        if len(dead):
            pick = torch.randint(len(x), (len(dead),), generator=generator).to(x.device)
            k, d = self.means.shape
            bandwidth = (4.0 / ((d + 2) * k)) ** (1.0 / (d + 4)) * z.std(0).clamp_min(1e-3)
            self.means[dead] = z[pick].to(self.means.dtype)
            self.log_scales[dead] = bandwidth.log().to(self.log_scales.dtype).expand(len(dead), d)
        return {"components_reseeded": int(len(dead)), "components_in_use": used}


MIXTURE_WEIGHTS = ("learned", "uniform")
"""``--prior-weights``: the mixture of Gaussians' weights learned through a softmax, or fixed at 1/K."""


def effective_number(weights: torch.Tensor) -> float:
    """exp(H(w)) of a probability vector: K for uniform weights, 1 when all mass is on one component."""
    w = weights.double() / weights.double().sum()
    return float(torch.exp(-(w * w.clamp_min(1e-300).log()).sum()))


class EnumeratedMixture(MixtureOfGaussians):
    """The mixture of Gaussians with its component as an explicit discrete latent:

        c ~ Categorical(pi),   z | c ~ N(mu_c, diag sigma_c^2)

    ``forward()`` is the marginal p(z) (for sampling and metrics); the training model uses
    :meth:`model_dist`, whose site ``"c"`` TraceEnum_ELBO sums out exactly."""

    enumerated = True

    def model_dist(self) -> dist.Distribution:
        c = pyro.sample("c", self.component_weights(), infer={"enumerate": "parallel"})
        return dist.Normal(self.means[c], self.log_scales.exp()[c]).to_event(1)


class VampPrior(Prior):
    """p(z) = (1/K) sum_k q(z | u_k): the encoder's posteriors at K learned pseudo-inputs
    u_k in [0, 1]^D (Tomczak & Welling 2018). :meth:`attach` receives the guide before use."""

    support = constraints.real_vector
    needs_guide = True
    traceable = True

    def __init__(self, latent_dim: int, data_dim: int, components: int = _DEFAULTS.prior_components):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        # pixels ~ N(0.05, 0.01^2), as the VampPrior code starts them on static MNIST (utils/load_data.py sets
        # pseudoinputs_mean = 0.05, pseudoinputs_std = 0.01); u = sigmoid(raw) keeps them in (0, 1)
        start = (0.05 + 0.01 * torch.randn(components, data_dim, generator=gen)).clamp(1e-3, 1 - 1e-3)
        self.raw_pseudo_inputs = nn.Parameter(torch.logit(start))
        self._guide: list = []  # held outside the module tree: the guide's parameters belong to the guide

    def attach(self, guide: nn.Module) -> None:
        self._guide[:] = [guide]

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        return torch.sigmoid(self.raw_pseudo_inputs)

    @torch.no_grad()
    def initialise_from_data(self, x: torch.Tensor, seed: int) -> None:
        """Pseudo-inputs = K training images (drawn without replacement from ``seed``) plus N(0, 0.01^2)
        noise, clamped into [1e-3, 1 - 1e-3] (u_k = sigmoid(raw_k)): the VampPrior code's
        ``use_training_data_init`` (``models/Model.py``: the first K shuffled training images
        ``+ 0.01 * np.random.randn``)."""
        k = self.raw_pseudo_inputs.shape[0]
        if len(x) < k:
            raise PyroVAEError(f"--prior-init data needs at least {k} training images, got {len(x)}")
        gen = torch.Generator().manual_seed(seed)
        chosen = x[torch.randperm(len(x), generator=gen)[:k]].cpu().float()
        u = (chosen + 0.01 * torch.randn(chosen.shape, generator=gen)).clamp(1e-3, 1 - 1e-3)
        self.raw_pseudo_inputs.copy_(torch.logit(u).to(self.raw_pseudo_inputs.device))

    def forward(self):
        if not self._guide:
            raise PyroVAEError("the VampPrior needs the guide: call prior.attach(guide) first")
        q = self._guide[0](self.pseudo_inputs)  # the K posteriors: batch (K,), event (d,); encoded once per call
        logits = torch.zeros(q.batch_shape, device=self.raw_pseudo_inputs.device)
        base = diagonal_normal(q)
        if base is not None:
            return DiagonalNormalMixture(logits, base.loc, base.scale)  # the default guide: the fast density
        return dist.MixtureSameFamily(dist.Categorical(logits=logits), q)
