"""Distributions on the unit sphere S^{d-1} = {z in R^d : |z| = 1}, densities w.r.t. its surface measure,
for any d >= 2, as Pyro distributions (batching and broadcasting of the mean direction and concentration):

    Uniform(S^{d-1})   p(z) = 1 / |S^{d-1}|,   |S^{d-1}| = 2 pi^{d/2} / Gamma(d/2)
    PowerSpherical     p(z; mu, kappa) = C(d, kappa) (1 + mu^T z)^kappa            (De Cao & Aziz 2020)
                       C = 1 / (2^{a+b} pi^b Gamma(a) / Gamma(a+b)),  a = (d-1)/2 + kappa,  b = (d-1)/2
    VonMisesFisher     p(z; mu, kappa) = C_d(kappa) exp(kappa mu^T z)                 (Davidson et al. 2018)
                       C_d = kappa^{d/2-1} / ((2 pi)^{d/2} I_{d/2-1}(kappa))

The power spherical is reparameterised without rejection or Bessel functions: t = mu^T z has
(t + 1)/2 ~ Beta(a, b), the direction orthogonal to mu is uniform on S^{d-2}, and a Householder
reflection takes e_1 to mu. Its KL to the uniform distribution is closed form (registered with
``torch.distributions.kl.register_kl``, so ``--objective analytic`` works). The von Mises-Fisher is here
as a prior and for evaluation: its normaliser goes through log I_v(kappa) computed stably from scipy's
exponentially scaled ``ive`` (with its exact gradient), and its sampler is Wood's (1994) rejection
sampler for t, which is not reparameterised.
"""

from __future__ import annotations

import math

import numpy as np
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch.distributions import register_kl

from ..errors import PyroVAEError

_EPS = 1e-7


def log_sphere_area(d: int) -> float:
    """log |S^{d-1}|, the surface area of the unit sphere in R^d."""
    return math.log(2) + (d / 2) * math.log(math.pi) - math.lgamma(d / 2)


def _check_dim(d: int) -> None:
    if d < 2:
        raise PyroVAEError(f"a distribution on the sphere S^(d-1) needs d >= 2, got d = {d}")


def _uniform_directions(shape, d: int, like: torch.Tensor) -> torch.Tensor:
    v = torch.randn(*shape, d, dtype=like.dtype, device=like.device)
    norm = v.norm(dim=-1, keepdim=True)
    # a normal draw of norm below _EPS (for d = 1, about 1 in 10^7) would give a vector shorter than 1, and z
    # off the sphere: it is replaced by e_1, which changes the law by nothing measurable
    e1 = torch.zeros_like(v)
    e1[..., 0] = 1
    return torch.where(norm > _EPS, v / norm.clamp_min(_EPS), e1)


def _rotate_from_e1(y: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """The Householder reflection taking e_1 to mu, applied to y: y - 2 (y.u) u, u = (e_1 - mu) / |e_1 - mu|
    (the identity where mu = e_1)."""
    e1 = torch.zeros_like(mu)
    e1[..., 0] = 1
    u = e1 - mu
    norm = u.norm(dim=-1, keepdim=True)
    u = torch.where(norm > _EPS, u / norm.clamp_min(_EPS), torch.zeros_like(u))
    return y - 2 * (y * u).sum(-1, keepdim=True) * u


class _SphereDistribution(dist.TorchDistribution):
    """Shared parts of the (mu, kappa) families: parameters, checks, shapes."""

    arg_constraints = {"loc": constraints.sphere, "concentration": constraints.nonnegative}
    support = constraints.sphere

    def __init__(self, loc: torch.Tensor, concentration, validate_args=None):
        loc = torch.as_tensor(loc)
        concentration = torch.as_tensor(concentration, dtype=loc.dtype, device=loc.device)
        if loc.dim() < 1:
            raise PyroVAEError("the mean direction mu must have shape (..., d)")
        _check_dim(loc.shape[-1])
        batch_shape = torch.broadcast_shapes(loc.shape[:-1], concentration.shape)
        self.loc = loc.expand(*batch_shape, loc.shape[-1])
        self.concentration = concentration.expand(batch_shape)
        self.dim = loc.shape[-1]
        super().__init__(batch_shape, torch.Size([self.dim]), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return type(self)(self.loc.expand(*batch_shape, self.dim), self.concentration.expand(batch_shape),
                          validate_args=self.__dict__.get("_validate_args"))

    @classmethod
    def infer_shapes(cls, loc, concentration):
        """(batch_shape, event_shape) from the parameters' shapes, as Pyro's distributions give them:
        ``loc`` (..., d) and ``concentration`` (...) broadcast to the batch; the event is (d,)."""
        return torch.broadcast_shapes(torch.Size(loc[:-1]), torch.Size(concentration)), torch.Size(loc[-1:])

    def _rotate(self, t: torch.Tensor, sample_shape) -> torch.Tensor:
        """z from t = mu^T z and a uniform direction orthogonal to mu."""
        v = _uniform_directions(t.shape, self.dim - 1, t)
        y = torch.cat([t.unsqueeze(-1), (1 - t * t).clamp_min(_EPS).sqrt().unsqueeze(-1) * v], -1)
        # the clamp (which keeps the gradient finite at t = +-1) leaves |y|^2 = t^2 + 1e-7 near the poles: on the
        # sphere to float32's precision, not to float64's, whose support check then refused the draws. Rescaled
        # to norm 1 (the reflection below keeps it), they lie on it in either dtype.
        y = y / y.norm(dim=-1, keepdim=True)
        return _rotate_from_e1(y, self.loc.expand(y.shape))


class PowerSpherical(_SphereDistribution):
    """The power spherical distribution PS(mu, kappa) on S^{d-1} (De Cao & Aziz 2020); see the module
    docstring. ``loc`` (..., d) unit vectors, ``concentration`` (...) >= 0; they broadcast."""

    has_rsample = True

    def _ab(self):
        b = torch.full_like(self.concentration, (self.dim - 1) / 2)
        return b + self.concentration, b

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        a, b = self._ab()
        beta = torch.distributions.Beta(a.expand(sample_shape + a.shape), b.expand(sample_shape + b.shape))
        t = 2 * beta.rsample() - 1
        return self._rotate(t, sample_shape)

    def log_normalizer(self) -> torch.Tensor:
        """log C(d, kappa), computed in float64 and returned in the parameters' dtype: its terms are of size
        d log d (lgamma at d = 1000 is about 2600), so in float32 their rounding alone would be 1e-4 nats."""
        return self._log_normalizer64().to(self.concentration.dtype)

    def _log_normalizer64(self) -> torch.Tensor:
        a, b = (t.double() for t in self._ab())
        return -((a + b) * math.log(2) + b * math.log(math.pi) + torch.lgamma(a) - torch.lgamma(a + b))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        cos = (self.loc * value).sum(-1)
        return self.log_normalizer() + self.concentration * torch.log1p(cos.clamp_min(-1 + _EPS))

    def entropy(self) -> torch.Tensor:
        """H = -(log C + kappa (log 2 + psi(a) - psi(a + b))), in float64 (then the parameters' dtype): in
        float32 the KL to the uniform, log |S^{d-1}| - H, came out negative (-3.7e-4 at d = 1000, kappa = 1e-3)."""
        return self._entropy64().to(self.concentration.dtype)

    def _entropy64(self) -> torch.Tensor:
        a, b = (t.double() for t in self._ab())
        kappa = self.concentration.double()
        return -(self._log_normalizer64() + kappa * (math.log(2) + torch.digamma(a) - torch.digamma(a + b)))

    @property
    def mean(self) -> torch.Tensor:
        a, b = self._ab()
        return self.loc * ((a - b) / (a + b)).unsqueeze(-1)

    @property
    def variance(self) -> torch.Tensor:
        """Var(z_i): with z = t mu + sqrt(1 - t^2) v, v uniform on the unit sphere orthogonal to mu,
        E[z z^T] = E[t^2] mu mu^T + (1 - E[t^2]) / (d - 1) (I - mu mu^T), where (t + 1) / 2 ~ Beta(a, b):
        E t = (a - b) / (a + b), E t^2 = 1 - 4 a b / ((a + b)(a + b + 1))."""
        a, b = self._ab()
        mean_t = ((a - b) / (a + b)).unsqueeze(-1)
        mean_t2 = (1 - 4 * a * b / ((a + b) * (a + b + 1))).unsqueeze(-1)
        mu2 = self.loc * self.loc
        return mean_t2 * mu2 + (1 - mean_t2) / (self.dim - 1) * (1 - mu2) - mean_t * mean_t * mu2


class _LogBesselI(torch.autograd.Function):
    """log I_v(x) (:func:`_log_i`: scipy's exponentially scaled ive, or the Debye expansion at large v), with
    its gradient d/dx log I_v(x) = I_{v+1}(x) / I_v(x) + v / x."""

    @staticmethod
    def forward(ctx, v: float, x: torch.Tensor):
        xs = x.detach().cpu().double().numpy()
        ctx.save_for_backward(x)
        ctx.v = v
        return torch.as_tensor(_log_i(v, xs), dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        xs = np.maximum(x.detach().cpu().double().numpy(), 1e-12)
        # I_{v+1} / I_v from the same log I_v as the forward pass (where ive underflows, both small-argument
        # terms: their ratio is the limit x / (2 (v + 1)))
        ratio = np.exp(_log_i(ctx.v + 1, xs) - _log_i(ctx.v, xs))
        return None, grad * torch.as_tensor(ratio + ctx.v / xs, dtype=x.dtype, device=x.device)


DEBYE_ORDER = 50.0
"""From this order v on, log I_v(x) is the uniform asymptotic (Debye) expansion, accurate for every x."""


def _log_i(v: float, x: np.ndarray) -> np.ndarray:
    """log I_v(x) in float64: scipy's ive below order :data:`DEBYE_ORDER` (the leading small-argument term
    where it underflows, which happens there only for x -> 0), the Debye expansion from it on."""
    from scipy.special import ive

    if v >= DEBYE_ORDER:
        return _log_i_debye(v, x)
    scaled = ive(v, x)
    with np.errstate(divide="ignore"):
        return np.where(scaled > 0, np.log(np.where(scaled > 0, scaled, 1.0)) + x, _log_i_small(v, x))


def _log_i_debye(v: float, x: np.ndarray) -> np.ndarray:
    """The uniform asymptotic expansion of I_v(v z) for large v (DLMF 10.41.3), uniform in z in (0, inf):

        I_v(v z) ~ exp(v eta) / ((2 pi v)^(1/2) (1 + z^2)^(1/4)) sum_k u_k(p) / v^k,
        eta = sqrt(1 + z^2) + log(z / (1 + sqrt(1 + z^2))),   p = 1 / sqrt(1 + z^2),

    with the polynomials u_1..u_4 of DLMF 10.41.10; the first term left out, u_5(p) / v^5, is below
    1e-9 relative from v = 50 on. Where scipy's ive underflows (order v = d/2 - 1 in the hundreds, kappa
    far below v) the small-argument term it replaced was off by up to tens of nats."""
    x = np.maximum(np.asarray(x, dtype=np.float64), 1e-300)
    z = x / v
    root = np.sqrt(1 + z * z)
    eta = root + np.log(z) - np.log1p(root)
    p = 1 / root
    p2 = p * p
    u1 = p * (3 - 5 * p2) / 24
    u2 = p2 * (81 - 462 * p2 + 385 * p2 * p2) / 1152
    u3 = p * p2 * (30375 - 369603 * p2 + 765765 * p2 ** 2 - 425425 * p2 ** 3) / 414720
    u4 = p2 * p2 * (4465125 - 94121676 * p2 + 349922430 * p2 ** 2 - 446185740 * p2 ** 3
                    + 185910725 * p2 ** 4) / 39813120
    series = 1 + u1 / v + u2 / v ** 2 + u3 / v ** 3 + u4 / v ** 4
    return v * eta - 0.5 * np.log(2 * np.pi * v) - 0.25 * np.log1p(z * z) + np.log(series)


def _log_i_small(v: float, x: np.ndarray) -> np.ndarray:
    """log I_v(x) ~ v log(x / 2) - log Gamma(v + 1), the leading term as x / sqrt(v + 1) -> 0."""
    from scipy.special import gammaln

    with np.errstate(divide="ignore"):
        return v * np.log(np.maximum(x, 1e-300) / 2) - gammaln(v + 1)


def log_bessel_i(v: float, x: torch.Tensor) -> torch.Tensor:
    """log I_v(x) for x > 0, stable for large x and v (float64 inside), differentiable in x."""
    return _LogBesselI.apply(float(v), x)


class VonMisesFisher(_SphereDistribution):
    """The von Mises-Fisher distribution vMF(mu, kappa) on S^{d-1}; see the module docstring. Sampling
    (Wood's rejection sampler for t) is not reparameterised: use it as a prior and for evaluation."""

    has_rsample = False

    def log_normalizer(self) -> torch.Tensor:
        """log C_d(kappa) in float64, returned in the parameters' dtype."""
        return self._log_normalizer64().to(self.concentration.dtype)

    def _log_normalizer64(self) -> torch.Tensor:
        v = self.dim / 2 - 1
        k = self.concentration.double().clamp_min(1e-6)
        return v * k.log() - (self.dim / 2) * math.log(2 * math.pi) - log_bessel_i(v, k)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return self.log_normalizer() + self.concentration * (self.loc * value).sum(-1)

    def entropy(self) -> torch.Tensor:
        """H = -log C_d(kappa) - kappa A_d(kappa), in float64 (then the parameters' dtype): each log I is
        about kappa, so in float32 their difference, and A_d, lost up to 5 nats at kappa = 1e4."""
        return self._entropy64().to(self.concentration.dtype)

    def _entropy64(self) -> torch.Tensor:
        return -self._log_normalizer64() - self.concentration.double() * self._mean_resultant_length64()

    def _mean_resultant_length(self) -> torch.Tensor:
        """A_d(kappa) = I_{d/2}(kappa) / I_{d/2-1}(kappa) = E[mu^T z]."""
        return self._mean_resultant_length64().to(self.concentration.dtype)

    def _mean_resultant_length64(self) -> torch.Tensor:
        k = self.concentration.double().clamp_min(1e-6)
        return torch.exp(log_bessel_i(self.dim / 2, k) - log_bessel_i(self.dim / 2 - 1, k))

    @property
    def mean(self) -> torch.Tensor:
        return self.loc * self._mean_resultant_length().unsqueeze(-1)

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        kappa = self.concentration.expand(shape).double()
        d = self.dim
        b = (d - 1) / (2 * kappa + torch.sqrt(4 * kappa ** 2 + (d - 1) ** 2))  # no cancellation for kappa >> d
        x0 = (1 - b) / (1 + b)
        c = kappa * x0 + (d - 1) * torch.log1p(-x0 ** 2)
        t = torch.full(shape, float("nan"), dtype=torch.float64, device=kappa.device)
        todo = torch.ones(shape, dtype=torch.bool, device=kappa.device)
        beta = torch.distributions.Beta(torch.tensor((d - 1) / 2, dtype=torch.float64, device=kappa.device),
                                        torch.tensor((d - 1) / 2, dtype=torch.float64, device=kappa.device))
        for _ in range(1000):  # Wood (1994): accepts with probability > 0.5 for every kappa and d
            if not todo.any():
                break
            e = beta.sample(shape)
            w = (1 - (1 + b) * e) / (1 - (1 - b) * e)
            u = torch.rand(shape, dtype=torch.float64, device=kappa.device)
            accept = todo & (kappa * w + (d - 1) * torch.log1p(-x0 * w) - c >= u.log())
            t = torch.where(accept, w, t)
            todo = todo & ~accept
        if todo.any():  # pragma: no cover - probability below 2^-1000
            raise RuntimeError("Wood's sampler did not accept within 1000 rounds")
        return self._rotate(t.to(self.loc.dtype), sample_shape)


class UniformSphereDistribution(dist.TorchDistribution):
    """The uniform distribution on the unit sphere S^{d-1} in R^d (density w.r.t. surface measure), in the
    ``dtype`` it is made with (draws, entropy), its log_prob in the value's floating dtype; with
    ``validate_args`` a value must have d coordinates and lie on the sphere."""

    arg_constraints = {}
    support = constraints.sphere
    has_rsample = True

    def __init__(self, dim: int, device=None, batch_shape=torch.Size(), validate_args=None,
                 dtype: torch.dtype | None = None):
        if dim < 2:
            raise PyroVAEError("a sphere prior needs latent_dim >= 2")
        self.dim = dim
        self._device = device
        self._dtype = dtype or torch.get_default_dtype()
        super().__init__(batch_shape, torch.Size([dim]), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return UniformSphereDistribution(self.dim, self._device, torch.Size(batch_shape),
                                         validate_args=self.__dict__.get("_validate_args"), dtype=self._dtype)

    def rsample(self, sample_shape=torch.Size()):
        x = torch.randn(self._extended_shape(sample_shape), device=self._device, dtype=self._dtype)
        return x / x.norm(dim=-1, keepdim=True)

    def log_prob(self, value):
        if self._validate_args:
            if value.shape[-1:] != self.event_shape:
                raise ValueError(f"a value of the uniform distribution on S^{self.dim - 1} has {self.dim} "
                                 f"coordinates, got shape {tuple(value.shape)}")
            self._validate_sample(value)
        dtype = value.dtype if value.is_floating_point() else self._dtype
        return torch.full(torch.broadcast_shapes(value.shape[:-1], self.batch_shape), -log_sphere_area(self.dim),
                          device=value.device, dtype=dtype)

    def entropy(self):
        return torch.full(self.batch_shape, log_sphere_area(self.dim), device=self._device, dtype=self._dtype)


@register_kl(PowerSpherical, UniformSphereDistribution)
def _kl_power_spherical_uniform(p, q):
    """KL(PS(mu, kappa) || Uniform(S^{d-1})) = log |S^{d-1}| - H(PS), the difference taken in float64 (both
    terms are of size d log d; in float32 it could come out negative)."""
    return (log_sphere_area(p.dim) - p._entropy64()).to(p.concentration.dtype)


@register_kl(VonMisesFisher, UniformSphereDistribution)
def _kl_vmf_uniform(p, q):
    return (log_sphere_area(p.dim) - p._entropy64()).to(p.concentration.dtype)


__all__ = ["PowerSpherical", "VonMisesFisher", "UniformSphereDistribution", "log_sphere_area", "log_bessel_i"]
