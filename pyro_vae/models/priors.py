"""Priors p(z): the one part of a VAE this toolkit is about swapping.

A prior is anything that, called with no arguments, returns a Pyro distribution with event
shape ``(latent_dim,)``: an ``nn.Module`` (its parameters then train with the model), or a
distribution object. A function or class taking ``latent_dim`` and returning either also works.
:func:`build_prior` is the single seam all of them pass, built-in or a user's own.

Scale-family priors (Laplace, logistic, uniform) are set to standard deviation ``scale`` per
coordinate, so that with the default scale 1 they match N(0, I) in variance.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import Permute, affine_autoregressive, spline, spline_coupling
from torch import nn

from ..errors import PyroVAEError


# --------------------------------------------------------------------------- fixed priors


class StandardNormal(nn.Module):
    """p(z) = N(0, I)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


class _Factorised(nn.Module):
    """p(z) = prod_i f(z_i), a fixed univariate family with location 0 and a scale."""

    def __init__(self, latent_dim: int, scale: float = 1.0):
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

    def __init__(self, latent_dim: int, df: float = 3.0, scale: float = 1.0):
        super().__init__(latent_dim, scale)
        self.register_buffer("df", torch.full((latent_dim,), float(df)))

    def forward(self):
        return dist.StudentT(self.df, self.loc, self.scale).to_event(1)


# --------------------------------------------------------------------------- learned priors


class LearnedNormal(nn.Module):
    """p(z) = N(mu, diag sigma^2) with mu and sigma learned (initialised at N(0, I))."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(latent_dim))

    def forward(self):
        return dist.Normal(self.loc, self.log_scale.exp()).to_event(1)


def _mixture_init(components: int, latent_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    means = torch.randn(components, latent_dim, generator=torch.Generator().manual_seed(0))
    return means, torch.full((components, latent_dim), 0.5)


class MixtureOfGaussians(nn.Module):
    """p(z) = sum_k pi_k N(z; mu_k, diag sigma_k^2), K components; weights, means and scales are
    learned, or fixed (uniform weights, means from a fixed seed, sigma = 0.5) with ``learnable=False``."""

    def __init__(self, latent_dim: int, components: int = 10, learnable: bool = True):
        super().__init__()
        means, scales = _mixture_init(components, latent_dim)
        tensors = {"logits": torch.zeros(components), "means": means, "log_scales": scales.log()}
        for name, value in tensors.items():
            if learnable:
                setattr(self, name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    def component_weights(self) -> dist.Categorical:
        return dist.Categorical(logits=self.logits)

    def components(self) -> dist.Distribution:
        return dist.Normal(self.means, self.log_scales.exp()).to_event(1)

    def forward(self):
        return dist.MixtureSameFamily(self.component_weights(), self.components())


class EnumeratedMixture(MixtureOfGaussians):
    """The mixture of Gaussians with its component as an explicit discrete latent:

        c ~ Categorical(pi),   z | c ~ N(mu_c, diag sigma_c^2)

    ``forward()`` is the marginal p(z) (for sampling and metrics); the training model uses
    :meth:`model_dist`, whose site ``"c"`` TraceEnum_ELBO sums out exactly."""

    enumerated = True

    def model_dist(self) -> dist.Distribution:
        c = pyro.sample("c", self.component_weights(), infer={"enumerate": "parallel"})
        return dist.Normal(self.means[c], self.log_scales.exp()[c]).to_event(1)


class VampPrior(nn.Module):
    """p(z) = (1/K) sum_k q(z | u_k): the encoder's posteriors at K learned pseudo-inputs
    u_k in [0, 1]^D (Tomczak & Welling 2018). Call :meth:`attach` with the guide before use."""

    support = constraints.real_vector
    needs_guide = True

    def __init__(self, latent_dim: int, data_dim: int, components: int = 50):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.raw_pseudo_inputs = nn.Parameter(-1.0 + 0.1 * torch.randn(components, data_dim, generator=gen))
        self._guide: list = []  # held outside the module tree: the guide's parameters belong to the guide

    def attach(self, guide: nn.Module) -> None:
        self._guide[:] = [guide]

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        return torch.sigmoid(self.raw_pseudo_inputs)

    def forward(self):
        if not self._guide:
            raise PyroVAEError("the VampPrior needs the guide: call prior.attach(guide) first")
        q = self._guide[0](self.pseudo_inputs)  # batch (K,), event (d,)
        weights = dist.Categorical(logits=torch.zeros(q.batch_shape, device=self.raw_pseudo_inputs.device))
        return dist.MixtureSameFamily(weights, q)


class FlowPrior(nn.Module):
    """p(z) = T # N(0, I), T a learned normalizing flow of ``layers`` Pyro transforms:
    ``spline-coupling`` (neural spline coupling layers with permutations), or
    ``affine-autoregressive`` (masked autoregressive flow: density in one pass)."""

    def __init__(self, latent_dim: int, kind: str = "spline-coupling", layers: int = 2):
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


class UniformSphereDistribution(dist.TorchDistribution):
    """The uniform distribution on the unit sphere S^{d-1} in R^d (density w.r.t. surface measure)."""

    arg_constraints = {}
    support = constraints.sphere
    has_rsample = True

    def __init__(self, dim: int, device=None, batch_shape=torch.Size(), validate_args=None):
        if dim < 2:
            raise PyroVAEError("a sphere prior needs latent_dim >= 2")
        self.dim = dim
        self._device = device
        super().__init__(batch_shape, torch.Size([dim]), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return UniformSphereDistribution(self.dim, self._device, torch.Size(batch_shape))

    def rsample(self, sample_shape=torch.Size()):
        x = torch.randn(self._extended_shape(sample_shape), device=self._device)
        return x / x.norm(dim=-1, keepdim=True)

    def log_prob(self, value):
        d = self.dim
        log_area = math.log(2) + (d / 2) * math.log(math.pi) - math.lgamma(d / 2)
        return torch.full(torch.broadcast_shapes(value.shape[:-1], self.batch_shape), -log_area,
                          device=value.device)


class UniformSphere(nn.Module):
    """p(z) = Uniform(S^{d-1}): every direction equally likely, |z| = 1."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def forward(self):
        return UniformSphereDistribution(self.latent_dim, self._anchor.device)


class ProjectedNormalPrior(nn.Module):
    """p(z) = ProjectedNormal(kappa e_1): z = y / |y|, y ~ N(kappa e_1, I); concentrated around e_1
    (kappa = concentration; Pyro implements its density for d = 2, 3, 4)."""

    def __init__(self, latent_dim: int, concentration: float = 2.0):
        super().__init__()
        if latent_dim not in (2, 3, 4):
            raise PyroVAEError(f"the projected-normal prior works for latent_dim 2, 3 or 4, got {latent_dim}")
        mean = torch.zeros(latent_dim)
        mean[0] = concentration
        self.register_buffer("concentration", mean)

    def forward(self):
        return dist.ProjectedNormal(self.concentration)


class DirichletPrior(nn.Module):
    """p(z) = Dirichlet(alpha, ..., alpha) on the simplex {z_i >= 0, sum z_i = 1}."""

    def __init__(self, latent_dim: int, concentration: float = 1.0):
        super().__init__()
        if latent_dim < 2:
            raise PyroVAEError("a Dirichlet prior needs latent_dim >= 2")
        self.register_buffer("concentration", torch.full((latent_dim,), float(concentration)))

    def forward(self):
        return dist.Dirichlet(self.concentration)


class RelaxedCategorical(nn.Module):
    """A discrete latent, relaxed: p(z) = RelaxedOneHotCategorical(tau, uniform) over latent_dim
    categories (Concrete / Gumbel-softmax, Maddison et al. 2017; Jang et al. 2017)."""

    preferred_guide = "relaxed-categorical"

    def __init__(self, latent_dim: int, temperature: float = 0.5):
        super().__init__()
        if latent_dim < 2:
            raise PyroVAEError("a categorical latent needs latent_dim >= 2 categories")
        self.register_buffer("logits", torch.zeros(latent_dim))
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self):
        return dist.RelaxedOneHotCategorical(self.temperature, logits=self.logits)


# --------------------------------------------------------------------------- adapters


class FixedDistribution(nn.Module):
    """Adapts a ready distribution object. Its tensors stay where they were made: to train on
    another device, write the prior as a module that returns the distribution."""

    def __init__(self, distribution: dist.Distribution):
        super().__init__()
        self.distribution = distribution

    def forward(self) -> dist.Distribution:
        return self.distribution


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class PriorOptions:
    """The prior's parameters, as given by the ``--prior-*`` flags."""

    scale: float = 1.0
    df: float = 3.0
    components: int = 10
    learnable: bool = True
    flow: str = "spline-coupling"
    flow_layers: int = 2
    concentration: float = 1.0
    temperature: float = 0.5
    data_dim: int | None = None

    @classmethod
    def from_config(cls, config, data_dim: int | None = None) -> "PriorOptions":
        return cls(scale=config.prior_scale, df=config.prior_df, components=config.prior_components,
                   learnable=config.prior_learnable, flow=config.prior_flow, flow_layers=config.prior_flow_layers,
                   concentration=config.prior_concentration, temperature=config.prior_temperature,
                   data_dim=data_dim)


PRIORS: dict[str, Callable[[int, PriorOptions], nn.Module]] = {
    "normal": lambda d, o: StandardNormal(d),
    "learned-normal": lambda d, o: LearnedNormal(d),
    "laplace": lambda d, o: Laplace(d, o.scale),
    "student-t": lambda d, o: StudentT(d, o.df, o.scale),
    "logistic": lambda d, o: Logistic(d, o.scale),
    "uniform": lambda d, o: UniformBox(d, o.scale),
    "mog": lambda d, o: MixtureOfGaussians(d, o.components, o.learnable),
    "mog-enum": lambda d, o: EnumeratedMixture(d, o.components, o.learnable),
    "vamp": lambda d, o: VampPrior(d, _need_data_dim(o), o.components),
    "flow": lambda d, o: FlowPrior(d, o.flow, o.flow_layers),
    "sphere": lambda d, o: UniformSphere(d),
    "projected-normal": lambda d, o: ProjectedNormalPrior(d, o.concentration),
    "dirichlet": lambda d, o: DirichletPrior(d, o.concentration),
    "relaxed-categorical": lambda d, o: RelaxedCategorical(d, o.temperature),
}
"""Built-in priors by command-line name: ``--prior NAME`` (options through ``--prior-*``)."""

TRACEABLE = frozenset(PRIORS) - {"flow"}
"""Built-in priors whose ELBO torch.jit traces correctly, so training compiles it by default
(tests/test_objectives.py checks each against the uncompiled ELBO). Not the flow: Pyro's spline
transforms fail in the traced graph on its second run. Nor a prior of the user's own, whose Python
control flow a trace could silently freeze."""


def _need_data_dim(options: PriorOptions) -> int:
    if options.data_dim is None:
        raise PyroVAEError("the VampPrior needs the data dimension (PriorOptions.data_dim)")
    return options.data_dim


def build_prior(spec, latent_dim: int, options: PriorOptions | None = None, check: bool = True) -> nn.Module:
    """A prior module from a built-in name, ``module:attribute``, a distribution, a module, or a
    function/class of ``latent_dim`` returning one of those. Checked with :func:`check_prior`
    (VampPrior-like priors, which need the guide, are checked once it is attached)."""
    options = options or PriorOptions()
    if isinstance(spec, str):
        if spec in PRIORS:
            prior = PRIORS[spec](latent_dim, options)
        elif ":" in spec:
            prior = _adapt(_import(spec), latent_dim)
        else:
            raise PyroVAEError(f"unknown prior {spec!r}; choose one of {', '.join(PRIORS)} or module:attribute")
    else:
        prior = _adapt(spec, latent_dim)
    if check and not getattr(prior, "needs_guide", False):
        check_prior(prior, latent_dim)
    return prior


def prior_reference(obj) -> str:
    """How config.json names a prior given as an object: ``module:qualname`` when importable, else ``<object>``."""
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if module and module != "__main__" and name and "<" not in name:
        reference = f"{module}:{name}"
        try:
            if _import(reference) is obj:
                return reference
        except PyroVAEError:
            pass
    return "<object>"


def _import(spec: str):
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:  # `--prior my_priors:cauchy` finds my_priors.py in the working directory
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError) as e:
        raise PyroVAEError(f"cannot import prior {spec!r}: {e}") from None


def _adapt(obj, latent_dim: int) -> nn.Module:
    if isinstance(obj, dist.Distribution):
        return FixedDistribution(obj)
    if isinstance(obj, nn.Module):
        return obj
    if callable(obj):
        if _takes_an_argument(obj):
            try:
                made = obj(latent_dim)
            except PyroVAEError:
                raise
            except Exception as e:
                raise PyroVAEError(f"the prior {getattr(obj, '__name__', obj)!r}({latent_dim}) failed: {e}") from None
            if isinstance(made, (dist.Distribution, nn.Module)):
                return _adapt(made, latent_dim)
            if callable(made):
                return _Call(made)
            raise PyroVAEError(f"the prior {getattr(obj, '__name__', obj)!r} returned a {type(made).__name__}, "
                               "not a distribution")
        return _Call(obj)
    raise PyroVAEError(f"a prior must be a distribution, a module or a callable, got {type(obj).__name__}")


def _takes_an_argument(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


class _Call(nn.Module):
    """A function of no arguments that returns the prior distribution."""

    def __init__(self, fn: Callable[[], dist.Distribution]):
        super().__init__()
        self.fn = fn

    def forward(self) -> dist.Distribution:
        return self.fn()


def prior_support(prior: nn.Module):
    """The prior's support, without calling a prior that is not ready yet (VampPrior)."""
    support = getattr(prior, "support", None)
    return support if support is not None else prior().support


def check_prior(prior: nn.Module, latent_dim: int) -> None:
    """The prior returns a distribution of event shape (latent_dim,) with a log_prob that is finite
    at its own samples, which lie in its declared support."""
    try:
        d = prior()
    except PyroVAEError:
        raise
    except Exception as e:
        raise PyroVAEError(f"the prior failed when called: {e}") from None
    if not isinstance(d, torch.distributions.Distribution):
        raise PyroVAEError(f"the prior must return a distribution, got {type(d).__name__}")
    if tuple(d.event_shape) != (latent_dim,):
        raise PyroVAEError(
            f"the prior's event shape {tuple(d.event_shape)} disagrees with latent_dim={latent_dim}"
            " (make a univariate prior multivariate with .expand([latent_dim]).to_event(1))"
        )
    if tuple(d.batch_shape) != ():
        raise PyroVAEError(f"the prior must have an empty batch shape, got {tuple(d.batch_shape)}")
    with torch.no_grad():
        z = d.sample((16,))
        try:
            lp = d.log_prob(z)
        except NotImplementedError:
            raise PyroVAEError(f"the prior {type(d).__name__} has no log_prob") from None
    if not bool(d.support.check(z).all()):
        raise PyroVAEError(f"the prior's samples leave its declared support {d.support}")
    if tuple(lp.shape) != (16,) or not torch.isfinite(lp).all():
        raise PyroVAEError("the prior's log_prob is not finite (or not one number per sample) at its own samples")
