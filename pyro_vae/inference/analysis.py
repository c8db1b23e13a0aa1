"""A trained VAE's posteriors, the ArviZ way: guide draws beside NUTS draws, diagnostics, the gaps.

For chosen data points x_n, three sets of draws of z (each shaped chain x draw, the guide's being
independent draws arranged the same way):

    guide       the amortized q(z | x_n) the VAE was trained with
    optimised   the same family fit to x_n alone (:func:`~pyro_vae.inference.pointwise.pointwise_guide`)
    nuts        NUTS on the exact posterior p(z | x_n) proportional to p(x_n | z) p(z)

This module orchestrates; each concern has its own home:

    settings.py         :class:`AnalysisSettings`, checked once
    mcmc.py             NUTS over z           pointwise.py    the per-point optimised guide
    gaps.py             log p(x), the ELBOs and the gaps of Cremer et al. (2018)
    idata.py            the InferenceData (its groups and dims), NetCDF, az.summary diagnostics
    analysis_plots.py   the figures
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import PyroVAEError
from ..run_dir import atomic_write_bytes, atomic_write_json
from ..seeding import seeded
from .analysis_plots import (plot_pair, plot_posterior_predictive, plot_prior_vs_posterior, plot_rank, plot_trace,
                             save_figures)
from .gaps import chunked_log_weights, compute_gaps
from .idata import az, build_inference_data, load_inference_data, sampler_report, save_inference_data, summarize
from .mcmc import NUTSResult, check_nuts_support, run_nuts
from .pointwise import pointwise_guide
from .settings import SEEDS, AnalysisSettings, settings_from

METHODS = ("guide", "optimised", "nuts")
IDATA, SUMMARY_CSV, SUMMARY_TXT, GAPS, FIGURES = "idata.nc", "summary.csv", "summary.txt", "gaps.json", "figures"


@dataclass
class Analysis:
    """The result of :func:`analyze`: the InferenceData, the per-latent table, the gaps, and the raw parts."""

    idata: az.InferenceData
    summary: "pandas.DataFrame"  # noqa: F821
    gaps: dict
    nuts: NUTSResult
    fitted: object | None  # the VAE copy with the per-point guide, or None
    seconds: float

    def report(self, max_rows: int = 40) -> str:
        return format_report(self, max_rows=max_rows)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the analysis


def analyze(vae, x: torch.Tensor, indices=None, labels=None, settings: AnalysisSettings | None = None, *,
            attrs: dict | None = None, **overrides) -> Analysis:
    """Analyse the posteriors of ``vae`` at the rows of ``x`` (N, D); see the module docstring.

    ``indices`` (N ints) name the rows in the ``obs`` coordinate (default 0..N-1); ``labels`` (N)
    go to ``constant_data``. ``settings`` (or its fields as keywords, :class:`AnalysisSettings`): NUTS
    ``num_chains`` x ``num_draws`` after ``warmup``, the guides as many independent draws;
    ``num_particles`` draws per data point for the ELBOs and log p(x); ``optimise=False`` skips the
    per-point guide (and so the split of the gap). Every input is checked before any work."""
    started = time.perf_counter()
    s = settings_from(settings, overrides)
    indices = _check_points(vae, x, indices, labels)
    x = x.to(vae.device)
    nuts = run_nuts(vae, x, s)
    draws = {"nuts": nuts.z}
    total = s.num_chains * s.num_draws
    with torch.no_grad(), seeded(s.seed * 1000 + SEEDS["guide"], x.device):
        draws["guide"] = vae.guide_dist(x).sample((total,)).reshape(s.num_chains, s.num_draws, len(x), -1)
    fitted = None
    if s.optimise:
        _say(s.progress, f"fitting the guide to each of the {len(x)} data points alone (L-BFGS)")
        fitted = pointwise_guide(vae, x, max_iter=s.optimise_iterations, num_particles=s.optimise_particles,
                                 seed=s.seed * 1000 + SEEDS["optimised"], progress=s.progress)
        with torch.no_grad(), seeded(s.seed * 1000 + SEEDS["optimised"], x.device):
            draws["optimised"] = fitted.guide_dist(x).sample((total,)).reshape(s.num_chains, s.num_draws, len(x), -1)
    methods = [m for m in METHODS if m in draws]
    z = torch.stack([draws[m] for m in methods], dim=2)  # (chain, draw, inference, obs, latent)

    _say(s.progress, f"estimating ELBOs and log p(x) with {s.num_particles} importance samples per data point")
    gaps = compute_gaps(vae, fitted, x, indices, labels, num_particles=s.num_particles, seed=s.seed, nuts_z=nuts.z)
    idata = build_inference_data(vae, x, z, methods, nuts, indices=indices, labels=labels, seed=s.seed,
                                 ppc_draws=s.ppc_draws, attrs=attrs)
    return Analysis(idata=idata, summary=summarize(idata), gaps=gaps, nuts=nuts, fitted=fitted,
                    seconds=time.perf_counter() - started)


def _check_points(vae, x: torch.Tensor, indices, labels) -> np.ndarray:
    """Check the data points (shape, indices, labels) and that NUTS and the guide can serve them;
    return the indices as an array."""
    if x.dim() != 2 or len(x) == 0:
        raise PyroVAEError(f"x must have shape (N, D) with N >= 1, got {tuple(x.shape)}")
    indices = np.arange(len(x)) if indices is None else np.asarray(indices, dtype=np.int64)
    if indices.shape != (len(x),) or len(set(indices.tolist())) != len(x):
        raise PyroVAEError(f"indices must be {len(x)} distinct integers, one per row of x")
    if labels is not None and len(labels) != len(x):
        raise PyroVAEError(f"labels must have one entry per row of x ({len(x)}), got {len(labels)}")
    x = x.to(vae.device)
    check_nuts_support(vae, x)
    vae.eval()
    with torch.no_grad():
        guide_shape, prior_shape = tuple(vae.guide_dist(x[:1]).event_shape), tuple(vae.prior().event_shape)
    if guide_shape != prior_shape:
        raise PyroVAEError(f"the guide's draws have event shape {guide_shape} but the prior's {prior_shape}")
    return indices


def format_report(analysis: Analysis, max_rows: int = 40) -> str:
    """The readable summary: sampler health, the gaps per data point, and the per-latent table."""
    table, gaps = analysis.summary, analysis.gaps
    lines = [sampler_report(analysis.idata)
             + f"; R-hat max {table['r_hat'].max():.3f}, ESS bulk min {table['ess_bulk'].min():.0f}, "
               f"ESS tail min {table['ess_tail'].min():.0f}"]
    if table["r_hat"].max() > 1.01:
        lines.append("  warning: R-hat > 1.01: the chains disagree; run more --warmup/--draws before trusting NUTS")
    if analysis.idata.sample_stats["diverging"].values.any():
        lines.append("  warning: divergent transitions: NUTS may have missed part of the posterior")
    lines += ["", f"gaps in nats; log p(x): {gaps['log_px_estimator']}, K = {gaps['num_particles']}"]
    cols = {"obs": "obs", "label": "label", "log_px": "log p(x)", "elbo_amortized": "ELBO amortized",
            "elbo_optimised": "ELBO optimised", "gap": "gap", "approximation_gap": "approximation",
            "amortization_gap": "amortization"}
    import pandas as pd

    frame = pd.DataFrame(gaps["per_obs"]).astype({c: str for c in ("obs", "label") if c in gaps["per_obs"][0]})
    frame = frame[[c for c in cols if c in frame]].rename(columns=cols)
    mean = {cols[k]: v for k, v in gaps["mean"].items()}
    mean.update(obs="mean")
    frame = pd.concat([frame, pd.DataFrame([mean])], ignore_index=True).fillna("")
    lines.append(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    shown = ["mean", "sd"]
    for method in ("guide", "optimised"):
        shown += [c for c in (f"{method}_mean", f"{method}_sd") if c in table]
    shown += ["ess_bulk", "r_hat"]
    lines += ["", "per latent: NUTS mean and sd against the guides' (mean, sd = NUTS)"]
    body = table[shown]
    if len(body) > max_rows:
        lines.append(f"(first {max_rows} of {len(body)} rows; all in {SUMMARY_CSV})")
        body = body.iloc[:max_rows]
    lines.append(body.to_string(float_format=lambda v: f"{v:.3f}"))
    lines += ["", "note: idata.nc's log_likelihood is log p(x_n | z) per image (summed over its pixels), for every "
              "draw of every method: ArviZ reads one method at a time, az.loo(idata.sel(inference='nuts')) and "
              "az.plot_ppc(idata.sel(inference='nuts')). LOO across images is not a model comparison here: each "
              "image has its own latent z, fit to that image, so leaving an image out leaves its z unidentified."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- files


def save_analysis(analysis: Analysis, out, figures: bool = True) -> dict[str, Path]:
    """Write idata.nc, summary.csv, summary.txt, gaps.json and (with ``figures``) figures/*.png to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"idata": save_inference_data(analysis.idata, out / IDATA)}
    atomic_write_bytes(out / SUMMARY_CSV, analysis.summary.to_csv().encode())
    atomic_write_bytes(out / SUMMARY_TXT, (analysis.report(max_rows=10**9) + "\n").encode())
    atomic_write_json(out / GAPS, analysis.gaps)
    paths.update(summary_csv=out / SUMMARY_CSV, summary_txt=out / SUMMARY_TXT, gaps=out / GAPS)
    if figures:
        paths.update(save_figures(analysis.idata, out / FIGURES))
    return paths


# --------------------------------------------------------------------------- a run directory


def analyze_run(run_path, out=None, *, split: str = "test", obs: int | None = None, indices=None,
                settings: AnalysisSettings | None = None, trust: bool = False, **overrides):
    """Analyse data points of a run directory's ``split`` and write the files of :func:`save_analysis` to
    ``out`` (default ``RUN/analysis``). ``indices`` picks data points by position in the split; else
    ``obs`` (default 4) of them are drawn at random from the settings' seed. ``settings`` (or its
    fields as keywords): :class:`AnalysisSettings`. ``trust``: see :func:`~pyro_vae.run_dir.load_run`.
    Returns (analysis, paths).

    Everything is checked before any sampling: the settings, the run directory, the prior's support,
    the split, the indices, the output directory, the memory the draws need."""
    from ..data import SPLITS
    from ..outputs import check_output_dir
    from ..resources import check_fits
    from ..run_dir import load_run

    s = settings_from(settings, overrides)
    if indices is not None and obs is not None:
        raise PyroVAEError("give either obs (how many data points) or indices (which ones), not both")
    if split not in SPLITS:
        raise PyroVAEError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if obs is not None and (isinstance(obs, bool) or not isinstance(obs, int) or obs < 1):
        raise PyroVAEError(f"--obs must be >= 1, got {obs!r} (obs)")
    run = load_run(run_path, trust=trust)
    check_nuts_support(run.vae)
    out = check_output_dir(Path(out) if out is not None else run.path / "analysis")
    x_all, labels_all = run.split(split)  # binarized as in training, where it was
    indices = _pick(indices, obs, len(x_all), split, s.seed)
    x = x_all[indices]
    labels = None if labels_all is None else labels_all[indices].tolist()
    draws = s.num_chains * s.num_draws * len(indices)
    check_fits(f"the analysis (--chains {s.num_chains} x --draws {s.num_draws} for {len(indices)} data points)",
               draws * (4 * run.vae.latent_dim + 2) + s.num_chains * min(s.ppc_draws, s.num_draws) * len(indices)
               * 2 * run.vae.data_dim)
    attrs = {"run": str(run.path), "split": split, "dataset": run.config.dataset, "prior_name": run.config.prior}
    analysis = analyze(run.vae, x, indices, labels, s, attrs=attrs)
    _say(s.progress, f"writing {out}/")
    paths = save_analysis(analysis, out, figures=s.figures)
    return analysis, paths


def _pick(indices, obs: int | None, n: int, split: str, seed: int) -> list[int]:
    """The data points to analyse: ``indices`` checked against the split's size, or ``obs`` (default 4)
    positions drawn at random from ``seed``."""
    if indices is not None:
        indices = [int(i) for i in indices]
        if not indices:
            raise PyroVAEError("indices is empty")
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise PyroVAEError(f"indices out of range for the {split} split of {n} data points: "
                               f"{', '.join(map(str, bad))}")
        if len(set(indices)) != len(indices):
            raise PyroVAEError("indices must be distinct")
        return indices
    count = 4 if obs is None else obs
    if count > n:
        raise PyroVAEError(f"obs={count} but the {split} split has {n} data points")
    from ..subsets import random_subset

    return sorted(random_subset(n, count, seed).indices.tolist())


__all__ = ["Analysis", "AnalysisSettings", "analyze", "analyze_run", "compute_gaps", "build_inference_data",
           "summarize", "format_report", "save_analysis", "save_inference_data", "load_inference_data",
           "save_figures", "plot_pair", "plot_trace", "plot_rank", "plot_prior_vs_posterior",
           "plot_posterior_predictive", "chunked_log_weights", "sampler_report", "METHODS"]
