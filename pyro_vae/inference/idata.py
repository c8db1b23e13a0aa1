"""The posterior analysis as an :class:`arviz.InferenceData`, its NetCDF file and its diagnostics.

Draws of z (chain, draw, inference, obs, latent) from the amortized guide, the per-point optimised
guide and NUTS go into one InferenceData with named dims: ``inference`` (the method: guide, optimised,
nuts; not called "method", which xarray's ``.sel`` takes as a keyword of its own, so ArviZ could not
select on it) and ``obs`` (the data points' indices in their split):

    posterior             z              (chain, draw, inference, obs, latent)
    prior                 z              (chain=1, draw, latent)
    posterior_predictive  x, x_mean      (chain, draw, inference, obs, pixel): x ~ p(x | z) and E[x | z]
                                          for a thinned subset of the draws (``draw`` keeps their numbers)
    log_likelihood        x              (chain, draw, inference, obs): log p(x_n | z), summed over pixels
    sample_stats          diverging, step_size, tree_depth, n_steps, acceptance_rate, lp   (NUTS)
    observed_data         x              (obs, pixel)
    constant_data         label          (obs), when the data have labels
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pyro
import torch

from ..errors import PyroVAEError
from ..run_dir import atomic_path
from ..seeding import seeded
from ..version import __version__
from .mcmc import NUTSResult
from .settings import SEEDS

with warnings.catch_warnings():  # ArviZ announces its coming refactor on import
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


@torch.no_grad()
def build_inference_data(vae, x: torch.Tensor, z: torch.Tensor, methods, nuts: NUTSResult, *, indices, labels=None,
                         seed: int = 0, ppc_draws: int = 50, attrs: dict | None = None) -> az.InferenceData:
    """The :class:`arviz.InferenceData` of the module docstring from z (chain, draw, inference, obs, latent)."""
    num_chains, num_draws, _, n_obs, latent_dim = z.shape
    coords = {"inference": list(methods), "obs": np.asarray(indices, dtype=np.int64),
              "latent": np.arange(latent_dim), "pixel": np.arange(x.shape[1])}
    lib = pyro
    posterior = az.dict_to_dataset({"z": _np(z)}, coords=coords, dims={"z": ["inference", "obs", "latent"]},
                                   library=lib)

    with seeded(seed * 1000 + SEEDS["prior"], x.device):
        prior_z = vae.prior().sample((num_chains * num_draws,))
    # the same prior draws under every (inference, obs), so that one selection of coordinates serves the
    # prior and the posterior alike (az.plot_dist_comparison); chain = 1
    prior_z = _np(prior_z)[None, :, None, None, :].repeat(len(methods), 2).repeat(n_obs, 3)
    prior = az.dict_to_dataset({"z": prior_z}, coords=coords, dims={"z": ["inference", "obs", "latent"]}, library=lib)

    log_lik = torch.empty(z.shape[:-1], dtype=torch.float32)
    for c in range(num_chains):  # one chain at a time: (draw, method, obs, D) decoded at once
        log_lik[c] = vae.likelihood(vae.decoder(z[c])).log_prob(x).float().cpu()
    log_likelihood = az.dict_to_dataset({"x": log_lik.numpy()}, coords=coords, dims={"x": ["inference", "obs"]},
                                        library=lib)

    keep = np.unique(np.linspace(0, num_draws - 1, min(ppc_draws, num_draws)).round().astype(np.int64))
    with seeded(seed * 1000 + SEEDS["predictive"], x.device):
        likelihood = vae.likelihood(vae.decoder(z[:, keep]))
        x_mean, x_rep = likelihood.mean, likelihood.sample()
    predictive = az.dict_to_dataset(
        {"x": _np(x_rep).astype(np.float32), "x_mean": _np(x_mean).astype(np.float32)},
        coords={**coords, "draw": keep},
        dims={"x": ["inference", "obs", "pixel"], "x_mean": ["inference", "obs", "pixel"]},
        library=lib,
    )

    sample_stats = az.dict_to_dataset({k: v for k, v in nuts.stats.items()}, library=lib,
                                      attrs={"num_divergences": nuts.num_divergences, "warmup": nuts.warmup,
                                             "seconds": round(nuts.seconds, 3)})
    observed = az.dict_to_dataset({"x": _np(x).astype(np.float32)}, coords=coords, dims={"x": ["obs", "pixel"]},
                                  default_dims=[], library=lib)
    groups = dict(posterior=posterior, prior=prior, posterior_predictive=predictive, log_likelihood=log_likelihood,
                  sample_stats=sample_stats, observed_data=observed)
    if labels is not None:
        groups["constant_data"] = az.dict_to_dataset({"label": np.asarray(labels, dtype=np.int64)}, coords=coords,
                                                     dims={"label": ["obs"]}, default_dims=[], library=lib)
    meta = {"pyro_vae_version": __version__, "latent_dim": int(vae.latent_dim),
            "image_shape": list(vae.image_shape), "prior": type(vae.prior()).__name__, "seed": int(seed),
            "nuts_chains": int(num_chains), "nuts_draws": int(num_draws), "nuts_warmup": int(nuts.warmup),
            "nuts_potential": nuts.extra.get("potential", ""), "nuts_dense_mass": int(nuts.extra.get("dense_mass", 0)),
            "methods": "guide: amortized q(z|x); optimised: the same family fit to each x alone; "
                       "nuts: NUTS on p(z|x)"}
    meta.update(_netcdf_attrs(attrs or {}))
    return az.InferenceData(attrs=meta, **groups)


def _netcdf_attrs(attrs: dict) -> dict:
    """Attributes NetCDF can store: numbers, strings, lists of them (bools as 0/1, None as "none")."""
    clean = {}
    for k, v in attrs.items():
        if isinstance(v, bool):
            v = int(v)
        elif v is None:
            v = "none"
        elif isinstance(v, os.PathLike):
            v = str(v)
        elif isinstance(v, (list, tuple)):
            v = [int(e) if isinstance(e, bool) else e for e in v]
        clean[k] = v
    return clean


def summarize(idata: az.InferenceData):
    """One row per (obs, latent): ``az.summary`` of the NUTS draws (mean, sd, HDI, MCSE, bulk and tail
    ESS, R-hat), then each guide's mean and sd beside them, and how far the guide is from NUTS:
    ``<method>_mean_shift`` = (mean - NUTS mean) / NUTS sd, ``<method>_sd_ratio`` = sd / NUTS sd."""
    import itertools

    import pandas as pd

    post = idata.posterior
    nuts = post[["z"]].sel(inference="nuts").drop_vars("inference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # few draws: ArviZ warns, the numbers say it anyway
        table = az.summary(nuts, var_names=["z"], round_to="none")
    obs, latent = post["obs"].values, post["latent"].values
    expected = [f"z[{o}, {l}]" for o, l in itertools.product(obs, latent)]
    if list(table.index) != expected:
        raise RuntimeError("unexpected az.summary row order")  # pragma: no cover - guards an ArviZ change
    table.index = pd.MultiIndex.from_product([obs, latent], names=["obs", "latent"])
    nuts_mean, nuts_sd = table["mean"].to_numpy(), table["sd"].to_numpy()
    for method in post["inference"].values:
        if method == "nuts":
            continue
        z = post["z"].sel(inference=method)
        mean = z.mean(("chain", "draw")).values.reshape(-1)
        sd = z.std(("chain", "draw"), ddof=1).values.reshape(-1)
        table[f"{method}_mean"] = mean
        table[f"{method}_sd"] = sd
        table[f"{method}_mean_shift"] = (mean - nuts_mean) / nuts_sd
        table[f"{method}_sd_ratio"] = sd / nuts_sd
    return table


def sampler_report(idata: az.InferenceData) -> str:
    stats = idata.sample_stats
    step = stats["step_size"].values
    depth = stats["tree_depth"].values
    return (f"NUTS: {stats.sizes['chain']} chains x {stats.sizes['draw']} draws "
            f"({idata.attrs.get('nuts_warmup', '?')} warm-up), {int(stats['diverging'].values.sum())} divergences, "
            f"step size {step.min():.3g}-{step.max():.3g}, tree depth mean {depth.mean():.2f} (max {depth.max()}), "
            f"acceptance {stats['acceptance_rate'].values.mean():.2f}")


def save_inference_data(idata: az.InferenceData, path) -> Path:
    """Write ``idata`` as NetCDF (h5netcdf) to a temporary name, then rename it into place."""
    with atomic_path(path) as tmp:
        idata.to_netcdf(tmp, engine="h5netcdf")
    return Path(path)


def load_inference_data(path) -> az.InferenceData:
    """Read an ``idata.nc`` fully into memory (no file handle left open)."""
    if not Path(path).is_file():
        raise PyroVAEError(f"{path} does not exist")
    with az.rc_context({"data.load": "eager"}):
        return az.from_netcdf(str(path), engine="h5netcdf")


__all__ = ["build_inference_data", "summarize", "sampler_report", "save_inference_data", "load_inference_data"]
