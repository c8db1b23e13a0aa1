"""Priors p(z): the one part of a VAE this toolkit is about swapping.

The protocol every prior follows is declared in :mod:`pyro_vae.models.base` (:class:`Prior`, its
hooks and their defaults); this module holds the built-in zoo, the registry behind ``--prior NAME``
and :func:`build_prior`, the single seam every prior passes, built-in or a user's own: a distribution,
a module returning one, or a function or class of ``latent_dim`` returning either.

Scale-family priors (Laplace, logistic, uniform) are set to standard deviation ``scale`` per
coordinate, so that with the default scale 1 they match N(0, I) in variance. Default parameters
come from :class:`~pyro_vae.config.Config`, the one place they are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import Permute, affine_autoregressive, spline, spline_coupling
from torch import nn

from ..config import Config
from ..errors import PyroVAEError
from ..numerics import HALF_LOG_2PI
from .base import CallablePrior, FixedDistribution, Prior, as_prior, check_prior
from .user_priors import OBJECT, UntrustedPrior, import_prior, prior_reference, with_arguments
from .mixtures import EnumeratedMixture, MixtureOfGaussians, VampPrior
from .sphere import PowerSpherical, UniformSphereDistribution, VonMisesFisher

_DEFAULTS = Config()


# --------------------------------------------------------------------------- fixed priors


class StandardNormal(Prior):
    """p(z) = N(0, I)."""

    traceable = True

    def __init__(self, latent_dim: int):
        super().__init__()
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, I) = -|z|^2 / 2 - d/2 log 2 pi, without building the distribution."""
        return (z * z).sum(-1).mul(-0.5) - z.shape[-1] * HALF_LOG_2PI


class _Factorised(Prior):
    """p(z) = prod_i f(z_i), a fixed univariate family with location 0 and a scale."""

    traceable = True

    def __init__(self, latent_dim: int, scale: float = _DEFAULTS.prior_scale):
        super().__init__()
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.full((latent_dim,), float(scale)))


class Laplace(_Factorised):
    """p(z) = prod_i Laplace(z_i; 0, s / sqrt 2)  (standard deviation s): sparse, peaked at 0."""

    def forward(self):
        return dist.Laplace(self.loc, self.scale / math.sqrt(2)).to_event(1)


class Logistic(_Factorised):
    """p(z) = prod_i Logistic(z_i; 0, s sqrt 3 / pi)  (standard deviation s)."""

    def forward(self):
        return dist.Logistic(self.loc, self.scale * math.sqrt(3) / math.pi).to_event(1)


class UniformBox(_Factorised):
    """p(z) = Uniform([-s sqrt 3, s sqrt 3]^d)  (standard deviation s): bounded support."""

    def forward(self):
        half = self.scale * math.sqrt(3)
        return dist.Uniform(-half, half).to_event(1)


class StudentT(_Factorised):
    """p(z) = prod_i StudentT(z_i; df, 0, s): heavy tails; N(0, s^2) as df -> inf."""

    def __init__(self, latent_dim: int, df: float = _DEFAULTS.prior_df, scale: float = _DEFAULTS.prior_scale):
        super().__init__(latent_dim, scale)
        self.register_buffer("df", torch.full((latent_dim,), float(df)))

    def forward(self):
        return dist.StudentT(self.df, self.loc, self.scale).to_event(1)


# --------------------------------------------------------------------------- learned priors


class LearnedNormal(Prior):
    """p(z) = N(mu, diag sigma^2) with mu and sigma learned (initialised at N(0, I))."""

    traceable = True

    def __init__(self, latent_dim: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(latent_dim))

    def forward(self):
        return dist.Normal(self.loc, self.log_scale.exp()).to_event(1)


class FlowPrior(Prior):
    """p(z) = T # N(0, I), T a learned normalizing flow of ``layers`` Pyro transforms:
    ``spline-coupling`` (neural spline coupling layers with permutations), or
    ``affine-autoregressive`` (masked autoregressive flow: density in one pass).

    Not ``traceable``: Pyro's spline transforms fail in a torch.jit-traced graph on its second run."""

    traceable = False

    def __init__(self, latent_dim: int, kind: str = _DEFAULTS.prior_flow, layers: int = _DEFAULTS.prior_flow_layers):
        super().__init__()
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))
        gen = torch.Generator().manual_seed(0)
        modules, self._order = [], []
        for i in range(layers):
            if latent_dim == 1:
                t = spline(1)
                modules.append(t)
                self._order.append((len(modules) - 1, False))
                continue
            if kind == "spline-coupling":
                t = spline_coupling(latent_dim)
            elif kind == "affine-autoregressive":
                t = affine_autoregressive(latent_dim)
            else:
                raise PyroVAEError(f"unknown flow {kind!r}; choose spline-coupling or affine-autoregressive")
            modules.append(t)
            self._order.append((len(modules) - 1, kind == "affine-autoregressive"))
            if i < layers - 1:
                self.register_buffer(f"perm{i}", torch.randperm(latent_dim, generator=gen))
                self._order.append((f"perm{i}", False))
        self.flows = nn.ModuleList(modules)

    def transforms(self) -> list:
        out = []
        for key, invert in self._order:
            if isinstance(key, str):
                out.append(Permute(getattr(self, key)))
            else:
                out.append(self.flows[key].inv if invert else self.flows[key])
        return out

    def forward(self):
        return dist.TransformedDistribution(dist.Normal(self.loc, self.scale).to_event(1), self.transforms())


# --------------------------------------------------------------------------- non-Euclidean supports


class UniformSphere(Prior):
    """p(z) = Uniform(S^{d-1}): every direction equally likely, |z| = 1."""

    traceable = True

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def forward(self):
        return UniformSphereDistribution(self.latent_dim, self._anchor.device, dtype=self._anchor.dtype)


class _SpherePrior(Prior):
    """A (mu, kappa) family on the sphere: the mean direction mu = m / |m| and the concentration
    kappa = softplus(k) learned (from mu = e_1 and the given kappa), or fixed at e_1 and kappa."""

    traceable = True
    family = None

    def __init__(self, latent_dim: int, concentration: float = _DEFAULTS.prior_concentration,
                 learnable: bool = _DEFAULTS.prior_learnable):
        super().__init__()
        if latent_dim < 2:
            raise PyroVAEError(f"a prior on the sphere needs latent_dim >= 2, got {latent_dim}")
        if not concentration > 0 or not math.isfinite(concentration):
            raise PyroVAEError(f"the concentration kappa must be a finite number > 0, got {concentration}")
        direction = torch.zeros(latent_dim)
        direction[0] = 1.0
        raw = torch.tensor(float(concentration)).expm1().log()  # softplus^-1
        if learnable:
            self.raw_direction, self.raw_concentration = nn.Parameter(direction), nn.Parameter(raw)
        else:
            self.register_buffer("raw_direction", direction)
            self.register_buffer("raw_concentration", raw)

    def forward(self):
        mu = self.raw_direction / self.raw_direction.norm().clamp_min(1e-12)
        return self.family(mu, torch.nn.functional.softplus(self.raw_concentration))


class PowerSphericalPrior(_SpherePrior):
    """p(z) = PowerSpherical(mu, kappa) on S^{d-1}, any d >= 2 (De Cao & Aziz 2020)."""

    family = staticmethod(lambda mu, kappa: PowerSpherical(mu, kappa))


class VonMisesFisherPrior(_SpherePrior):
    """p(z) = vMF(mu, kappa) on S^{d-1}, any d >= 2. Not traceable: its normaliser's Bessel function is
    computed by scipy, outside the graph a trace would record."""

    traceable = False
    family = staticmethod(lambda mu, kappa: VonMisesFisher(mu, kappa))


class ProjectedNormalPrior(Prior):
    """p(z) = ProjectedNormal(kappa e_1): z = y / |y|, y ~ N(kappa e_1, I); concentrated around e_1
    (kappa = concentration; Pyro implements its density for d = 2, 3, 4)."""

    traceable = True

    def __init__(self, latent_dim: int, concentration: float = _DEFAULTS.prior_concentration):
        super().__init__()
        if latent_dim not in (2, 3, 4):
            raise PyroVAEError(f"the projected-normal prior works for latent_dim 2, 3 or 4, got {latent_dim}")
        mean = torch.zeros(latent_dim)
        mean[0] = concentration
        self.register_buffer("concentration", mean)

    def forward(self):
        return dist.ProjectedNormal(self.concentration)


class DirichletPrior(Prior):
    """p(z) = Dirichlet(alpha, ..., alpha) on the simplex {z_i >= 0, sum z_i = 1}."""

    traceable = True

    def __init__(self, latent_dim: int, concentration: float = _DEFAULTS.prior_concentration):
        super().__init__()
        if latent_dim < 2:
            raise PyroVAEError("a Dirichlet prior needs latent_dim >= 2")
        self.register_buffer("concentration", torch.full((latent_dim,), float(concentration)))

    def forward(self):
        return dist.Dirichlet(self.concentration)


class RelaxedCategorical(Prior):
    """A discrete latent, relaxed: p(z) = RelaxedOneHotCategorical(tau, uniform) over latent_dim
    categories (Concrete / Gumbel-softmax, Maddison et al. 2017; Jang et al. 2017)."""

    preferred_guide = "relaxed-categorical"
    traceable = True

    def __init__(self, latent_dim: int, temperature: float = _DEFAULTS.prior_temperature):
        super().__init__()
        if latent_dim < 2:
            raise PyroVAEError("a categorical latent needs latent_dim >= 2 categories")
        self.register_buffer("logits", torch.zeros(latent_dim))
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self):
        return dist.RelaxedOneHotCategorical(self.temperature, logits=self.logits)

    def guide_temperature(self) -> float:
        return float(self.temperature)


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class PriorOptions:
    """The prior's parameters, as given by the ``--prior-*`` flags (defaults: :class:`Config`'s)."""

    scale: float = _DEFAULTS.prior_scale
    df: float = _DEFAULTS.prior_df
    components: int = _DEFAULTS.prior_components
    learnable: bool = _DEFAULTS.prior_learnable
    weights: str = _DEFAULTS.prior_weights
    reseed: bool = _DEFAULTS.prior_reseed
    flow: str = _DEFAULTS.prior_flow
    flow_layers: int = _DEFAULTS.prior_flow_layers
    concentration: float = _DEFAULTS.prior_concentration
    temperature: float = _DEFAULTS.prior_temperature
    data_dim: int | None = None
    args: tuple = ()            # (name, value) pairs for a prior of your own (--prior-arg)
    path: str | None = None     # the folder its module is imported from (--prior-path)

    @classmethod
    def from_config(cls, config: Config, data_dim: int | None = None) -> "PriorOptions":
        return cls(scale=config.prior_scale, df=config.prior_df, components=config.prior_components,
                   learnable=config.prior_learnable, weights=config.prior_weights,
                   reseed=config.prior_reseed, flow=config.prior_flow, flow_layers=config.prior_flow_layers,
                   concentration=config.prior_concentration, temperature=config.prior_temperature,
                   data_dim=data_dim, args=tuple(sorted(config.prior_args.items())), path=config.prior_path)


PRIORS: dict[str, Callable[[int, PriorOptions], Prior]] = {
    "normal": lambda d, o: StandardNormal(d),
    "learned-normal": lambda d, o: LearnedNormal(d),
    "laplace": lambda d, o: Laplace(d, o.scale),
    "student-t": lambda d, o: StudentT(d, o.df, o.scale),
    "logistic": lambda d, o: Logistic(d, o.scale),
    "uniform": lambda d, o: UniformBox(d, o.scale),
    "mog": lambda d, o: MixtureOfGaussians(d, o.components, o.learnable, o.weights, o.reseed),
    "mog-enum": lambda d, o: EnumeratedMixture(d, o.components, o.learnable, o.weights, o.reseed),
    "vamp": lambda d, o: VampPrior(d, _need_data_dim(o), o.components),
    "flow": lambda d, o: FlowPrior(d, o.flow, o.flow_layers),
    "sphere": lambda d, o: UniformSphere(d),
    "power-spherical": lambda d, o: PowerSphericalPrior(d, o.concentration, o.learnable),
    "vmf": lambda d, o: VonMisesFisherPrior(d, o.concentration, o.learnable),
    "projected-normal": lambda d, o: ProjectedNormalPrior(d, o.concentration),
    "dirichlet": lambda d, o: DirichletPrior(d, o.concentration),
    "relaxed-categorical": lambda d, o: RelaxedCategorical(d, o.temperature),
}
"""Built-in priors by command-line name: ``--prior NAME`` (options through ``--prior-*``)."""

FLOWS = ("spline-coupling", "affine-autoregressive")
"""The transforms :class:`FlowPrior` builds (``--prior-flow``)."""

USES = {"prior_scale": ("laplace", "logistic", "uniform", "student-t"), "prior_df": ("student-t",),
        "prior_components": ("mog", "mog-enum", "vamp"),
        "prior_learnable": ("mog", "mog-enum", "power-spherical", "vmf"),
        "prior_weights": ("mog", "mog-enum"), "prior_reseed": ("mog", "mog-enum"),
        "prior_flow": ("flow",), "prior_flow_layers": ("flow",), "prior_init": ("vamp",),
        "prior_concentration": ("projected-normal", "dirichlet", "power-spherical", "vmf"),
        "prior_temperature": ("relaxed-categorical",)}
"""Which built-in priors each ``--prior-*`` option applies to (``--prior-arg`` applies to priors of your own)."""


def options_without_effect(priors: list[str], given: set[str]) -> list[str]:
    """The options in ``given`` (Config field names) that none of ``priors`` uses, as flags."""
    unused = [name for name, users in USES.items() if name in given and not set(users) & set(priors)]
    if "prior_args" in given and all(p in PRIORS for p in priors):
        unused.append("prior_args")
    return ["--prior-arg" if n == "prior_args" else "--" + n.replace("_", "-") for n in unused]


def _need_data_dim(options: PriorOptions) -> int:
    if options.data_dim is None:
        raise PyroVAEError("the VampPrior needs the data dimension (PriorOptions.data_dim)")
    return options.data_dim


def build_prior(spec, latent_dim: int, options: PriorOptions | None = None, check: bool = True, *,
                allow_import: bool = True) -> Prior:
    """A :class:`Prior` from a built-in name, ``module:attribute``, a distribution, a module, or a
    function/class of ``latent_dim`` returning one of those. Checked with :func:`check_prior`
    (priors that need the guide are checked once it is attached).

    ``allow_import=False`` refuses ``module:attribute``: importing a module runs its code, so a name
    read from a file (a run directory's config.json) is imported only when the caller trusts it."""
    options = options or PriorOptions()
    if isinstance(spec, str):
        if spec in PRIORS:
            prior = PRIORS[spec](latent_dim, options)
        elif ":" in spec:
            if not allow_import:
                raise UntrustedPrior(spec)
            prior = as_prior(with_arguments(import_prior(spec, options.path), options.args), latent_dim)
        else:
            raise PyroVAEError(f"unknown prior {spec!r}; choose one of {', '.join(PRIORS)} or module:attribute")
    else:
        prior = as_prior(with_arguments(spec, options.args), latent_dim)
    if check and not prior.needs_guide:
        check_prior(prior, latent_dim)
    return prior


__all__ = ["Prior", "PriorOptions", "PRIORS", "FLOWS", "USES", "options_without_effect", "build_prior",
           "UntrustedPrior", "import_prior", "check_prior", "prior_reference", "OBJECT",
           "FixedDistribution", "CallablePrior", "StandardNormal", "LearnedNormal", "Laplace", "Logistic",
           "UniformBox", "StudentT", "MixtureOfGaussians", "EnumeratedMixture", "VampPrior", "FlowPrior",
           "UniformSphere", "PowerSphericalPrior", "VonMisesFisherPrior", "ProjectedNormalPrior", "DirichletPrior", "RelaxedCategorical",
           "UniformSphereDistribution"]
