"""Exact-posterior draws of z for given data points, to hold the amortized guide against.

* :func:`run_nuts` runs NUTS (``pyro.infer.MCMC``) on p(z | x) proportional to p(x | z) p(z), the trained
  VAE's own model conditioned on x: every data point's z is a block of one joint state (the
  posterior factorises over data points, so this is the same target as one chain per point).
  Constrained priors (simplex, positive, interval, ...) are sampled in unconstrained space through
  Pyro's own ``biject_to`` transforms. Chains run one after another in this process (never in
  worker processes), each from its own seed, so the result depends on ``seed`` only.
* :func:`check_nuts_support` refuses, before any work, priors and latent sites NUTS cannot handle.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import MCMC, NUTS
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.distributions import biject_to

from ..errors import PyroVAEError
from ..models.supports import describe, unwrap_mixture
from ..seeding import seeded
from .settings import AnalysisSettings, settings_from
from .tracking import bar as _bar

SAMPLE_STATS = ("diverging", "step_size", "tree_depth", "n_steps", "acceptance_rate", "lp", "energy")


# --------------------------------------------------------------------------- what NUTS can sample


class SphereProjection(torch.distributions.Transform):
    """y -> y / |y|, from R^d onto the sphere; its "inverse" takes a point of the sphere to itself (one of
    its preimages). Not a bijection: NUTS samples y under the augmented density of
    :func:`unconstrained_log_joint`, whose directions are the target on the sphere."""

    domain = constraints.real_vector
    codomain = constraints.sphere
    bijective = False

    def __eq__(self, other):
        return isinstance(other, SphereProjection)

    def _call(self, y):
        return y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def _inverse(self, z):
        return z


def support_transform(support, what: str = "z"):
    """``biject_to(support)`` (looking through mixtures): the map from unconstrained space that NUTS
    samples in; for the sphere, :class:`SphereProjection`. :class:`PyroVAEError` naming the support where
    there is none (a discrete support, or e.g. a simplex of torch's without ``biject_to``)."""
    base = unwrap_mixture(support)
    if base is constraints.sphere:
        return SphereProjection()
    if base.is_discrete:
        raise PyroVAEError(
            f"NUTS cannot sample {what}: its support {describe(support)} is discrete "
            "(HMC/NUTS needs a continuous latent with a gradient)"
        )
    try:
        return biject_to(base)
    except NotImplementedError:
        raise PyroVAEError(
            f"NUTS cannot sample {what}: its support {describe(support)} has no bijection to unconstrained "
            "space (torch.distributions.biject_to), which Pyro's NUTS needs"
        ) from None


def check_nuts_support(vae, x: torch.Tensor | None = None) -> dict:
    """Raise :class:`PyroVAEError` if NUTS cannot sample the posterior over z: a prior with a discrete
    support, or one without ``biject_to`` (other than the sphere, sampled by augmentation). With ``x`` (a batch of data),
    also check every other latent sample site of ``vae.model`` the same way. Cheap: one prior call and,
    with ``x``, one trace of the model on a single data point.

    Returns the transforms from unconstrained space, by site name (only ``"z"`` without ``x``)."""
    prior = vae.prior()
    transforms = {"z": support_transform(prior.support, f"z under the prior {type(prior).__name__}")}
    if x is None:
        return transforms
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(vae.model).get_trace(x[:1])
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site) or name == "z":
            continue
        transforms[name] = support_transform(site["fn"].support,
                                             f"the latent site {name!r} ({type(site['fn']).__name__})")
    return transforms


# --------------------------------------------------------------------------- NUTS


class RecordingNUTS(NUTS):
    """Pyro's NUTS that also records, for every kept draw, what ArviZ calls the sample stats:
    ``diverging``, ``step_size``, ``tree_depth`` (number of doublings: 2^depth - 1 leapfrog steps),
    ``n_steps`` (leapfrog steps taken), ``acceptance_rate`` (mean Metropolis acceptance over the
    trajectory), ``lp`` (the log density of the draw in unconstrained space, up to a constant) and
    ``energy`` (the Hamiltonian, potential plus kinetic energy, where the iteration's trajectory starts,
    after the momentum is drawn: what ``az.bfmi`` and ``az.plot_energy`` read)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records: list[dict] = []
        self._n_steps = 0
        self._depth = 0
        self._energy = None

    def _build_basetree(self, *args, **kwargs):
        self._n_steps += 1
        return super()._build_basetree(*args, **kwargs)

    def _build_tree(self, z, r, z_grads, log_slice, direction, tree_depth, energy_current):
        self._depth = max(self._depth, tree_depth + 1)
        if self._energy is None:
            self._energy = float(energy_current)
        return super()._build_tree(z, r, z_grads, log_slice, direction, tree_depth, energy_current)

    def sample(self, params):
        self._n_steps = self._depth = 0
        self._energy = None
        divergences, mean_accept = len(self._divergences), self._mean_accept_prob
        step_size = float(self.step_size)
        out = super().sample(params)
        n = self._t - self._warmup_steps
        if n > 0:  # a kept draw (Pyro counts the acceptance running mean from 1 again after warm-up)
            accept = mean_accept + n * (self._mean_accept_prob - mean_accept)
            self.records.append({
                "diverging": len(self._divergences) > divergences,
                "step_size": step_size,
                "tree_depth": self._depth,
                "n_steps": self._n_steps,
                "acceptance_rate": float(accept),
                "lp": -float(self._potential_energy_last),
                "energy": self._energy if self._energy is not None else float("nan"),
            })
        return out


@dataclass
class NUTSResult:
    """NUTS draws of z for N data points: ``z`` has shape (chain, draw, N, latent_dim); ``stats`` maps
    each name of :data:`SAMPLE_STATS` to an array of shape (chain, draw)."""

    z: torch.Tensor
    stats: dict[str, np.ndarray]
    warmup: int
    seed: int
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def num_chains(self) -> int:
        return self.z.shape[0]

    @property
    def num_draws(self) -> int:
        return self.z.shape[1]

    @property
    def num_divergences(self) -> int:
        return int(self.stats["diverging"].sum())


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread. NUTS and L-BFGS make long sequences of tiny tensor operations, for which
    a thread pool only adds synchronisation, and on a busy machine a lot of it: 10 to 50 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def frozen(module: nn.Module):
    """The module in eval mode with no parameter requiring a gradient; restored afterwards."""
    was_training = module.training
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)


def is_plain_vae(vae) -> bool:
    """Whether ``vae.model`` is :meth:`VAE.model` itself (z ~ prior, x ~ likelihood(decoder(z))), whose
    log density :func:`direct_potential` computes without Pyro's tracing (several times faster)."""
    from ..models.vae import VAE

    return isinstance(vae, VAE) and type(vae).model is VAE.model


def unconstrained_log_joint(vae, x: torch.Tensor):
    """(log_joint, transform) for a plain VAE: with z = transform(u), transform = biject_to(prior.support)
    (the components' support for a mixture),

        log_joint(u) = log p(z) + log p(x | z) + log |det dz/du|     per data point: shape u.shape[:-1]

    for u of shape (..., N, d_u), broadcasting against x (N, D). It is the log density NUTS samples
    (up to log p(x)), and the importance weight's numerator for proposals in unconstrained space.

    On the sphere (no bijection from R^d) the standard augmentation: u in R^d with z = u / |u| and

        log_joint(u) = log p(z) + log p(x | z) + log N(u; 0, I_d) + log |S^{d-1}|,

    under which z has the target density on the sphere and |u| an independent chi_d radius (a N(0, I)
    vector's direction is uniform and independent of its length), so that HMC moves freely in R^d
    and the u-integral of exp(log_joint) is p(x)."""
    prior = vae.prior()
    transform = support_transform(prior.support)
    if isinstance(transform, SphereProjection):
        from ..models.sphere import log_sphere_area

        d = prior.event_shape[-1]
        const = log_sphere_area(d) - 0.5 * d * math.log(2 * math.pi)

        def log_joint_sphere(u: torch.Tensor) -> torch.Tensor:
            z = transform(u)
            return (prior.log_prob(z) + vae.likelihood(vae.decoder(z)).log_prob(x) - 0.5 * (u * u).sum(-1)
                    + const)

        return log_joint_sphere, transform

    def log_joint(u: torch.Tensor) -> torch.Tensor:
        z = transform(u)
        jacobian = transform.log_abs_det_jacobian(u, z)
        if jacobian.shape != z.shape[:-1]:  # an elementwise transform: sum over the event
            jacobian = jacobian.sum(-1)
        return prior.log_prob(z) + vae.likelihood(vae.decoder(z)).log_prob(x) + jacobian

    return log_joint, transform


def direct_potential(vae, x: torch.Tensor):
    """(potential_fn, transform) for NUTS on p(z | x) of a plain VAE, in unconstrained space u:
    potential(u) = -sum_n log_joint(u)_n (see :func:`unconstrained_log_joint`), the same density Pyro
    builds from the traced model, minus the tracing."""
    log_joint, transform = unconstrained_log_joint(vae, x)

    def potential(params):
        return -log_joint(params["z"]).sum()

    return potential, transform


def _init_to_uniform(transforms: dict):
    """Pyro's ``init_to_uniform`` (uniform in (-2, 2) in unconstrained space) with our transforms."""

    def init(site):
        value = site["fn"].sample().detach()
        transform = transforms.get(site["name"])
        if transform is None:
            return value
        u = transform.inv(value)
        return transform(torch.rand_like(u) * 4 - 2)

    return init


def run_nuts(vae, x: torch.Tensor, settings: AnalysisSettings | None = None, **overrides) -> NUTSResult:
    """NUTS draws from p(z | x_n) for each row x_n of ``x`` under the trained model.

    From :class:`~pyro_vae.inference.settings.AnalysisSettings` (``settings``, or its fields as keywords):
    ``num_chains`` chains of ``warmup`` adaptation steps (step size and mass matrix: diagonal, or with
    ``dense_mass`` a full one over all N * latent_dim coordinates, which pays off for correlated
    posteriors of a few dimensions) and ``num_draws`` kept draws; chain c starts uniformly in (-2, 2) in
    unconstrained space (Pyro's ``init_to_uniform``), from seed ``seed * 1000 + c``. The global random
    state is left untouched.

    For a plain :class:`~pyro_vae.models.vae.VAE` the potential is computed directly
    (:func:`direct_potential`); a subclass with its own ``model`` is sampled through Pyro's tracing of
    that model, whatever its sites (discrete ones are refused by :func:`check_nuts_support`)."""
    s = settings_from(settings, overrides)
    num_chains, num_draws, warmup, seed, progress = s.num_chains, s.num_draws, s.warmup, s.seed, s.progress
    x = x.to(vae.device)
    transforms = check_nuts_support(vae, x)
    if not is_plain_vae(vae) and any(isinstance(t, SphereProjection) for t in transforms.values()):
        raise PyroVAEError("NUTS on the sphere samples the augmented density of the plain VAE model; this "
                           f"model ({type(vae).__name__}.model) is traced by Pyro, which has no such augmentation")
    started = time.perf_counter()
    chains, records = [], []
    bar = _bar(total=num_chains * (warmup + num_draws), enabled=progress, unit="it", desc="NUTS",
               dynamic_ncols=True)
    state = {"chain": 0}

    def hook(kernel, params, stage, i):
        bar.update()
        if i % 10 == 0:
            bar.set_postfix_str(f"chain {state['chain'] + 1}/{num_chains} {stage.lower()}, "
                                f"step size {kernel.step_size:.3g}, divergences {len(kernel._divergences)}",
                                refresh=False)

    common = dict(target_accept_prob=s.target_accept_prob, max_tree_depth=s.max_tree_depth, full_mass=s.dense_mass)
    try:
        with frozen(vae), single_thread():
            direct = is_plain_vae(vae)
            if direct:
                potential, transform = direct_potential(vae, x)
                with torch.no_grad():
                    unconstrained_shape = transform.inv(vae.prior().sample((len(x),))).shape
            for chain in range(num_chains):
                state["chain"] = chain
                with seeded(seed * 1000 + chain, x.device):
                    if direct:
                        kernel = RecordingNUTS(potential_fn=potential, **common)
                        init = torch.rand(unconstrained_shape, device=x.device, dtype=x.dtype) * 4 - 2
                        mcmc = MCMC(kernel, num_samples=num_draws, warmup_steps=warmup, initial_params={"z": init},
                                    transforms={"z": transform.inv}, disable_progbar=True, hook_fn=hook)
                    else:
                        # explicit transforms and start: Pyro's own biject_to fails on a mixture's support
                        kernel = RecordingNUTS(vae.model, max_plate_nesting=1,
                                               transforms={k: t.inv for k, t in transforms.items()},
                                               init_strategy=_init_to_uniform(transforms), **common)
                        mcmc = MCMC(kernel, num_samples=num_draws, warmup_steps=warmup, disable_progbar=True,
                                    hook_fn=hook)
                    mcmc.run(x)
                chains.append(mcmc.get_samples()["z"].detach())
                records.append(kernel.records)
    finally:
        bar.close()
    z = torch.stack(chains)  # (chain, draw, N, d)
    stats = {name: np.array([[r[name] for r in chain_records] for chain_records in records]) for name in SAMPLE_STATS}
    return NUTSResult(z=z, stats=stats, warmup=warmup, seed=seed, seconds=time.perf_counter() - started,
                      extra={"target_accept_prob": s.target_accept_prob, "max_tree_depth": s.max_tree_depth,
                             "dense_mass": s.dense_mass, "potential": "direct" if direct else "pyro-trace"})


__all__ = ["check_nuts_support", "support_transform", "run_nuts", "unconstrained_log_joint", "direct_potential",
           "is_plain_vae", "NUTSResult", "RecordingNUTS", "SAMPLE_STATS", "frozen", "single_thread"]
