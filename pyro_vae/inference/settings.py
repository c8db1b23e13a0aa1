"""The settings of a posterior analysis, checked once (:meth:`AnalysisSettings.validate`) wherever they
enter: the command line, :func:`~pyro_vae.inference.analysis.analyze_run`,
:func:`~pyro_vae.inference.analysis.analyze` and :func:`~pyro_vae.inference.mcmc.run_nuts`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ..errors import PyroVAEError

SEED_LIMIT = 2**32
SEEDS = {"guide": 1, "optimised": 2, "prior": 3, "predictive": 4, "amortized_weights": 5, "nuts_weights": 7}
"""Offsets of the private random streams of an analysis: stream ``seed * 1000 + SEEDS[what]``."""


@dataclass(frozen=True)
class AnalysisSettings:
    """How to analyse a trained VAE's posteriors (the CLI flag of each field in brackets).

    NUTS: ``num_chains`` [--chains] chains, one after another, of ``warmup`` [--warmup] adaptation steps
    and ``num_draws`` [--draws] kept draws; ``dense_mass`` [--dense-mass] adapts a full mass matrix.
    The per-point guide (``optimise`` [--no-optimise]) runs L-BFGS for at most ``optimise_iterations``
    on an ELBO of ``optimise_particles`` draws. ``num_particles`` [--particles] importance samples per
    data point estimate the ELBOs and log p(x); the posterior predictive keeps ``ppc_draws`` draws per
    chain. Everything random follows ``seed`` [--seed]."""

    num_chains: int = 4
    num_draws: int = 500
    warmup: int = 500
    seed: int = 0
    dense_mass: bool = False
    target_accept_prob: float = 0.8
    max_tree_depth: int = 10
    optimise: bool = True
    optimise_particles: int = 1024
    optimise_iterations: int = 200
    num_particles: int = 5000
    ppc_draws: int = 50
    figures: bool = True
    progress: bool = True

    FLAGS = {"num_chains": "--chains", "num_draws": "--draws", "warmup": "--warmup", "seed": "--seed",
             "num_particles": "--particles", "max_tree_depth": "--max-tree-depth",
             "optimise_particles": "--optimise-particles", "optimise_iterations": "--optimise-iterations",
             "ppc_draws": "--ppc-draws", "target_accept_prob": "--target-accept-prob"}

    def replace(self, **changes) -> "AnalysisSettings":
        """A copy with ``changes`` (field names), validated; an unknown name is a clear error."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise PyroVAEError(f"unknown analysis settings: {', '.join(unknown)}")
        return dataclasses.replace(self, **changes).validate()

    def validate(self) -> "AnalysisSettings":
        """Raise :class:`PyroVAEError` naming the first setting out of range (with its CLI flag)."""
        least = {"num_chains": 1, "num_draws": 1, "warmup": 0, "seed": 0, "num_particles": 1, "max_tree_depth": 1,
                 "optimise_particles": 1, "optimise_iterations": 1, "ppc_draws": 1}
        for name, low in least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise PyroVAEError(f"{self.FLAGS[name]} must be >= {low}, got {value!r} ({name})")
        if self.seed >= SEED_LIMIT:
            raise PyroVAEError(f"--seed must be < 2^32, got {self.seed} (seed)")
        for name, high in MOST.items():
            if getattr(self, name) > high:
                raise PyroVAEError(f"{self.FLAGS[name]} must be at most {high:,}, got {getattr(self, name):,} ({name}): "
                                   "a number that large is a run that never ends on a CPU")
        if not (isinstance(self.target_accept_prob, float) and math.isfinite(self.target_accept_prob)
                and 0 < self.target_accept_prob < 1):
            raise PyroVAEError(f"--target-accept-prob must lie in (0, 1), got {self.target_accept_prob!r}")
        return self


MOST = {"num_particles": 1_000_000, "optimise_particles": 1_000_000, "num_draws": 1_000_000, "warmup": 1_000_000,
        "num_chains": 1_000, "optimise_iterations": 1_000_000, "ppc_draws": 1_000_000, "max_tree_depth": 20}
"""The largest value of each count an analysis takes (10^12 importance samples hung rather than failed)."""


def settings_from(settings: AnalysisSettings | None, overrides: dict) -> AnalysisSettings:
    """``settings`` (default: the defaults) with keyword ``overrides``, validated."""
    return (settings or AnalysisSettings()).replace(**overrides)
