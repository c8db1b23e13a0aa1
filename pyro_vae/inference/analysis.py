"""A trained VAE's posteriors, the ArviZ way: guide draws beside NUTS draws, diagnostics, the gaps.

For chosen data points x_n, three sets of draws of z (each shaped chain x draw, the guide's being
independent draws arranged the same way):

    guide       the amortized q(z | x_n) the VAE was trained with
    optimised   the same family fit to x_n alone (:func:`~pyro_vae.inference.mcmc.pointwise_guide`)
    nuts        NUTS on the exact posterior p(z | x_n) proportional to p(x_n | z) p(z)

go into one :class:`arviz.InferenceData` with named dims ``chain, draw, inference, obs, latent``:
``inference`` (the method: guide, optimised, nuts; not called "method", which xarray's ``.sel``
takes as a keyword of its own, so ArviZ could not select on it) and ``obs`` (the data points'
indices in their split):

    posterior             z              (chain, draw, inference, obs, latent)
    prior                 z              (chain=1, draw, latent)
    posterior_predictive  x, x_mean      (chain, draw, inference, obs, pixel): x ~ p(x | z) and E[x | z]
                                          for a thinned subset of the draws (``draw`` keeps their numbers)
    log_likelihood        x              (chain, draw, inference, obs): log p(x_n | z), summed over pixels
    sample_stats          diverging, step_size, tree_depth, n_steps, acceptance_rate, lp   (NUTS)
    observed_data         x              (obs, pixel)
    constant_data         label          (obs), when the data have labels

The gaps of Cremer, Li & Duvenaud (2018), "Inference suboptimality in variational autoencoders",
per data point, in nats:

    gap              = log p(x) - ELBO(amortized q)
    approximation    = log p(x) - ELBO(optimised q)          the family's limit
    amortization     = ELBO(optimised q) - ELBO(amortized q)  the encoder's shortfall

ELBOs are Monte Carlo means over K draws (the two guides reparametrise the same base noise, so the
amortization gap, their difference, is precise); log p(x) is the importance-weighted estimate
log (1/K) sum_k p(x, z_k) / r(z_k | x), a stochastic lower bound that tightens as K grows and as the
proposal r nears the posterior. r is a Student-t fit to the NUTS draws (so it covers the posterior's
correlations, which a mean-field guide misses, and with heavier tails), else the optimised guide.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from ..errors import PyroVAEError
from ..run_dir import atomic_path, atomic_write_bytes, atomic_write_json
from .mcmc import NUTSResult, check_nuts_support, check_positive, pointwise_guide, run_nuts
from .evaluate import held_out
from .metrics import log_weights
from ..seeding import seeded

with warnings.catch_warnings():  # ArviZ announces its coming refactor on import
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

METHODS = ("guide", "optimised", "nuts")
IDATA, SUMMARY_CSV, SUMMARY_TXT, GAPS, FIGURES = "idata.nc", "summary.csv", "summary.txt", "gaps.json", "figures"
_SEEDS = {"guide": 1, "optimised": 2, "prior": 3, "predictive": 4, "amortized_weights": 5, "nuts_weights": 7}


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


def analyze(vae, x: torch.Tensor, indices=None, labels=None, *, num_chains: int = 4, num_draws: int = 500,
            warmup: int = 500, seed: int = 0, optimise: bool = True, num_particles: int = 5000,
            optimise_particles: int = 1024, dense_mass: bool = False, ppc_draws: int = 50, progress: bool = True,
            attrs: dict | None = None) -> Analysis:
    """Analyse the posteriors of ``vae`` at the rows of ``x`` (N, D); see the module docstring.

    ``indices`` (N ints) name the rows in the ``obs`` coordinate (default 0..N-1); ``labels`` (N)
    go to ``constant_data``. NUTS: ``num_chains`` x ``num_draws`` after ``warmup``; the guides give
    as many independent draws. ``num_particles`` draws per data point estimate the ELBOs and log p(x).
    ``optimise=False`` skips the per-point guide (and so the split of the gap). ``ppc_draws``: how many
    draws per chain the posterior predictive keeps. Every input is checked before any work."""
    started = time.perf_counter()
    check_positive(num_chains=num_chains, num_draws=num_draws, num_particles=num_particles,
                   optimise_particles=optimise_particles, ppc_draws=ppc_draws)
    if not isinstance(warmup, (int, np.integer)) or warmup < 0:
        raise PyroVAEError(f"warmup must be a non-negative integer, got {warmup!r}")
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

    nuts = run_nuts(vae, x, num_chains=num_chains, num_draws=num_draws, warmup=warmup, seed=seed,
                    dense_mass=dense_mass, progress=progress)
    draws = {"nuts": nuts.z}
    total = num_chains * num_draws
    with torch.no_grad(), seeded(seed * 1000 + _SEEDS["guide"], x.device):
        draws["guide"] = vae.guide_dist(x).sample((total,)).reshape(num_chains, num_draws, len(x), -1)
    fitted = None
    if optimise:
        _say(progress, f"fitting the guide to each of the {len(x)} data points alone (L-BFGS)")
        fitted = pointwise_guide(vae, x, num_particles=optimise_particles, seed=seed * 1000 + _SEEDS["optimised"],
                                 progress=progress)
        with torch.no_grad(), seeded(seed * 1000 + _SEEDS["optimised"], x.device):
            draws["optimised"] = fitted.guide_dist(x).sample((total,)).reshape(num_chains, num_draws, len(x), -1)
    methods = [m for m in METHODS if m in draws]
    z = torch.stack([draws[m] for m in methods], dim=2)  # (chain, draw, inference, obs, latent)

    _say(progress, f"estimating ELBOs and log p(x) with {num_particles} importance samples per data point")
    gaps = compute_gaps(vae, fitted, x, indices, labels, num_particles=num_particles, seed=seed, nuts_z=nuts.z)
    idata = build_inference_data(vae, x, z, methods, nuts, indices=indices, labels=labels, seed=seed,
                                 ppc_draws=ppc_draws, attrs=attrs)
    summary = summarize(idata)
    return Analysis(idata=idata, summary=summary, gaps=gaps, nuts=nuts, fitted=fitted,
                    seconds=time.perf_counter() - started)


@torch.no_grad()
def chunked_log_weights(vae, x: torch.Tensor, num_particles: int, chunk: int = 500) -> torch.Tensor:
    """:func:`~pyro_vae.inference.metrics.log_weights` in chunks of particles, shape (K, N), float64."""
    parts, left = [], num_particles
    while left > 0:
        k = min(chunk, left)
        parts.append(log_weights(vae, x, k).double())
        left -= k
    return torch.cat(parts)


def _log_mean_exp(lw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per column: log mean exp(lw), its delta-method standard error, and Kish's effective sample size."""
    k = lw.shape[0]
    shifted = torch.exp(lw - lw.max(0).values)
    mean = shifted.mean(0)
    stderr = shifted.std(0) / math.sqrt(k) / mean
    ess = shifted.sum(0) ** 2 / (shifted**2).sum(0)
    return torch.logsumexp(lw, 0) - math.log(k), stderr, ess


@torch.no_grad()
def nuts_proposal_log_weights(vae, x: torch.Tensor, nuts_z: torch.Tensor, num_particles: int, df: float = 5.0,
                              chunk: int = 500) -> torch.Tensor:
    """Importance log-weights log p(x, z_k) - log r(z_k), shape (K, N), float64, from a proposal r fit to
    the NUTS draws: per data point a multivariate Student-t (``df`` degrees of freedom, so heavier
    tails and a wider spread than the draws) with their mean and covariance, in the unconstrained
    space u = biject_to(support)^-1(z) where the density of z carries the Jacobian. A proposal that
    covers the whole posterior: its log-mean-exp estimates log p(x) much more tightly than a
    mean-field guide's (which is too narrow when the posterior is correlated)."""
    from .mcmc import unconstrained_log_joint

    log_joint, transform = unconstrained_log_joint(vae, x)
    u = transform.inv(nuts_z.to(x.device)).double()  # (chain, draw, N, d_u)
    u = u.reshape(-1, *u.shape[2:])
    proposals = []
    for n in range(u.shape[1]):
        un = u[:, n][torch.isfinite(u[:, n]).all(-1)]
        if len(un) <= un.shape[-1] + 1:
            raise PyroVAEError(f"too few finite NUTS draws ({len(un)}) to fit an importance proposal")
        loc = un.mean(0)
        cov = torch.cov(un.T).reshape(un.shape[-1], un.shape[-1])
        jitter = 1e-8 * cov.diagonal().mean().clamp_min(1e-12)
        cov = cov + jitter * torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
        proposals.append((loc, torch.linalg.cholesky(cov)))
    loc = torch.stack([p[0] for p in proposals])
    tril = torch.stack([p[1] for p in proposals])
    proposal = dist.MultivariateStudentT(torch.tensor(df, dtype=loc.dtype, device=loc.device), loc, tril)
    parts, left = [], num_particles
    while left > 0:
        k = min(chunk, left)
        uk = proposal.sample((k,))  # (k, N, d_u), float64
        lw = log_joint(uk.to(x.dtype)).double() - proposal.log_prob(uk)
        parts.append(lw)
        left -= k
    return torch.cat(parts)


def compute_gaps(vae, fitted, x: torch.Tensor, indices, labels=None, num_particles: int = 5000, seed: int = 0,
                 nuts_z: torch.Tensor | None = None) -> dict:
    """The ELBOs, log p(x) and the gaps per data point (see the module docstring), as a JSON-ready dict.

    ``fitted``: the VAE with the per-point guide from :func:`pointwise_guide`, or None (then only the
    total gap). log p(x) is estimated by importance sampling with K = ``num_particles`` draws from the
    best proposal available: one fit to the NUTS draws ``nuts_z`` (:func:`nuts_proposal_log_weights`;
    plain VAEs only), else the optimised guide, else the amortized guide. The estimates from the other
    proposals are kept beside it (``log_px_<proposal>_proposal``)."""
    from .mcmc import is_plain_vae

    estimates = {}
    with seeded(seed * 1000 + _SEEDS["amortized_weights"], x.device):
        lw_amortized = chunked_log_weights(vae, x, num_particles)
    elbo_amortized = lw_amortized.mean(0)
    elbo_amortized_se = lw_amortized.std(0) / math.sqrt(num_particles)
    estimates["amortized"] = _log_mean_exp(lw_amortized)
    if fitted is not None:
        # the same seed as the amortized guide's: common random numbers (the same base noise reparametrised
        # by both guides), so the amortization gap, a difference of the two ELBOs, has a small Monte Carlo error
        with seeded(seed * 1000 + _SEEDS["amortized_weights"], x.device):
            lw_optimised = chunked_log_weights(fitted, x, num_particles)
        elbo_optimised = lw_optimised.mean(0)
        elbo_optimised_se = lw_optimised.std(0) / math.sqrt(num_particles)
        amortization_se = (lw_optimised - lw_amortized).std(0) / math.sqrt(num_particles)
        estimates["optimised"] = _log_mean_exp(lw_optimised)
    if nuts_z is not None and is_plain_vae(vae):
        with seeded(seed * 1000 + _SEEDS["nuts_weights"], x.device):
            estimates["nuts"] = _log_mean_exp(nuts_proposal_log_weights(vae, x, nuts_z, num_particles))
    chosen = next(k for k in ("nuts", "optimised", "amortized") if k in estimates)
    log_px, log_px_se, ess = estimates[chosen]
    rows = []
    for n in range(len(x)):
        row = {"obs": int(indices[n])}
        if labels is not None:
            row["label"] = int(labels[n])
        row.update(log_px=log_px[n].item(), log_px_stderr=log_px_se[n].item(), importance_ess=ess[n].item())
        row.update({f"log_px_{k}_proposal": v[0][n].item() for k, v in estimates.items() if k != chosen})
        row.update(elbo_amortized=elbo_amortized[n].item(), elbo_amortized_stderr=elbo_amortized_se[n].item(),
                   gap=(log_px[n] - elbo_amortized[n]).item())
        if fitted is not None:
            row.update(elbo_optimised=elbo_optimised[n].item(), elbo_optimised_stderr=elbo_optimised_se[n].item(),
                       approximation_gap=(log_px[n] - elbo_optimised[n]).item(),
                       approximation_gap_stderr=math.hypot(log_px_se[n].item(), elbo_optimised_se[n].item()),
                       amortization_gap=(elbo_optimised[n] - elbo_amortized[n]).item(),
                       amortization_gap_stderr=amortization_se[n].item())
        rows.append(row)
    keys = ["log_px", "elbo_amortized", "gap"] + (["elbo_optimised", "approximation_gap", "amortization_gap"]
                                                  if fitted is not None else [])
    values = {k: np.array([r[k] for r in rows]) for k in keys}
    described = {"nuts": "a multivariate Student-t (df 5) fit to the NUTS draws, in unconstrained space",
                 "optimised": "the optimised per-point guide", "amortized": "the amortized guide"}
    return {
        "units": "nats per data point",
        "num_particles": num_particles,
        "log_px_estimator": f"importance weighted, proposal: {described[chosen]}",
        "definitions": {
            "gap": "log p(x) - ELBO(amortized guide)",
            "approximation_gap": "log p(x) - ELBO(guide of the same family optimised for this x)",
            "amortization_gap": "ELBO(optimised guide) - ELBO(amortized guide)",
        },
        "per_obs": rows,
        "mean": {k: float(v.mean()) for k, v in values.items()},
        "stderr_over_obs": {k: (float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None)
                            for k, v in values.items()},
    }


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


@torch.no_grad()
def build_inference_data(vae, x: torch.Tensor, z: torch.Tensor, methods, nuts: NUTSResult, *, indices, labels=None,
                         seed: int = 0, ppc_draws: int = 50, attrs: dict | None = None) -> az.InferenceData:
    """The :class:`arviz.InferenceData` of the module docstring from z (chain, draw, inference, obs, latent)."""
    import pyro_vae

    num_chains, num_draws, _, n_obs, latent_dim = z.shape
    coords = {"inference": list(methods), "obs": np.asarray(indices, dtype=np.int64),
              "latent": np.arange(latent_dim), "pixel": np.arange(x.shape[1])}
    lib = pyro
    posterior = az.dict_to_dataset({"z": _np(z)}, coords=coords, dims={"z": ["inference", "obs", "latent"]},
                                   library=lib)

    with seeded(seed * 1000 + _SEEDS["prior"], x.device):
        prior_z = vae.prior().sample((num_chains * num_draws,))
    prior = az.dict_to_dataset({"z": _np(prior_z)[None]}, coords=coords, dims={"z": ["latent"]}, library=lib)

    log_lik = torch.empty(z.shape[:-1], dtype=torch.float32)
    for c in range(num_chains):  # one chain at a time: (draw, method, obs, D) decoded at once
        log_lik[c] = vae.likelihood(vae.decoder(z[c])).log_prob(x).float().cpu()
    log_likelihood = az.dict_to_dataset({"x": log_lik.numpy()}, coords=coords, dims={"x": ["inference", "obs"]},
                                        library=lib)

    keep = np.unique(np.linspace(0, num_draws - 1, min(ppc_draws, num_draws)).round().astype(np.int64))
    with seeded(seed * 1000 + _SEEDS["predictive"], x.device):
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
    meta = {"pyro_vae_version": pyro_vae.__version__, "latent_dim": int(vae.latent_dim),
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


# --------------------------------------------------------------------------- diagnostics


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
    return "\n".join(lines)


# --------------------------------------------------------------------------- files


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


# --------------------------------------------------------------------------- figures

_COLOURS = {"prior": "0.6", "guide": "C1", "optimised": "C2", "nuts": "k"}


def informative_latents(idata: az.InferenceData, obs, k: int = 4) -> list[int]:
    """The k latents whose NUTS posterior is narrowest relative to the prior's spread (at ``obs``, a value
    or a list of values of the obs coordinate), in index order: those the data inform most."""
    z = idata.posterior["z"].sel(inference="nuts", obs=obs)
    sd = z.std(("chain", "draw"))
    if "obs" in sd.dims:
        sd = sd.mean("obs")
    prior_sd = idata.prior["z"].std(("chain", "draw"))
    ratio = (sd / prior_sd).values
    return sorted(int(i) for i in np.argsort(ratio, kind="stable")[:k])


def _thin(a: np.ndarray, n: int) -> np.ndarray:
    return a[np.linspace(0, len(a) - 1, min(n, len(a))).round().astype(int)]


def plot_pair(idata: az.InferenceData, obs, path, max_latents: int = 4, points: int = 800) -> Path:
    """Pair plot at one data point: the guides' draws over NUTS draws, for the most informed latents."""
    import matplotlib.pyplot as plt

    from ..plots import save_figure

    latents = informative_latents(idata, obs, max_latents)
    post = idata.posterior["z"].sel(obs=obs)
    methods = list(post["inference"].values)
    k = len(latents)
    fig, axes = plt.subplots(k, k, figsize=(2.4 * k + 1.2, 2.4 * k + 0.6), squeeze=False)
    draws = {m: post.sel(inference=m).stack(s=("chain", "draw")).transpose("s", "latent").values for m in methods}
    order = [m for m in ("guide", "optimised", "nuts") if m in methods]
    for i, li in enumerate(latents):
        for j, lj in enumerate(latents):
            ax = axes[i, j]
            if j > i:
                ax.set_axis_off()
                continue
            for m in order:
                d = _thin(draws[m], points)
                if i == j:
                    ax.hist(draws[m][:, li], bins=40, density=True, histtype="step", color=_COLOURS[m], lw=1.3)
                else:
                    ax.scatter(d[:, lj], d[:, li], s=3, alpha=0.35 if m == "nuts" else 0.25, color=_COLOURS[m],
                               rasterized=True)
            if i == k - 1:
                ax.set_xlabel(f"z[{lj}]")
            if j == 0 and i != j:
                ax.set_ylabel(f"z[{li}]")
            if i == j:
                ax.set_yticks([])
    handles = [plt.Line2D([], [], color=_COLOURS[m], marker="o", ls="", label=_label(m)) for m in order]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, bbox_to_anchor=(0.5, -0.01))
    label = _obs_label(idata, obs)
    fig.suptitle(f"q(z|x) draws against NUTS draws from p(z|x)\ndata point {obs}{label}")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save_figure(fig, path)


def _label(method: str) -> str:
    return {"guide": "amortized guide", "optimised": "optimised guide", "nuts": "NUTS (exact posterior)"}[method]


def _obs_label(idata, obs) -> str:
    if "constant_data" in idata.groups() and "label" in idata.constant_data:
        return f" (label {int(idata.constant_data['label'].sel(obs=obs))})"
    return ""


def _selection(idata, max_obs: int, max_latents: int) -> dict:
    obs = [o.item() for o in idata.posterior["obs"].values[:max_obs]]
    return {"inference": "nuts", "obs": obs, "latent": informative_latents(idata, obs, max_latents)}


def plot_trace(idata: az.InferenceData, path, max_obs: int = 2, max_latents: int = 3) -> Path:
    """ArviZ trace plot of the NUTS chains (one colour per chain) for a few data points and latents."""
    from ..plots import save_figure

    coords = _selection(idata, max_obs, max_latents)
    with warnings.catch_warnings():  # ArviZ: few draws; matplotlib: ArviZ uses an API it deprecates
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        axes = az.plot_trace(idata, var_names=["z"], coords=coords, compact=False, legend=False,
                             labeller=az.labels.DimCoordLabeller(), backend_kwargs={"layout": "constrained"})
    fig = np.atleast_2d(axes)[0, 0].figure
    fig.suptitle("NUTS chains (one colour each): densities and traces")
    return save_figure(fig, path)


def plot_rank(idata: az.InferenceData, path, max_obs: int = 2, max_latents: int = 3) -> Path:
    """ArviZ rank plot of the NUTS chains: flat, overlapping histograms mean the chains agree."""
    from ..plots import save_figure

    import matplotlib.pyplot as plt

    coords = _selection(idata, max_obs, max_latents)
    panels = len(coords["obs"]) * len(coords["latent"])
    ncols = min(panels, 3)
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.8 * nrows), squeeze=False)
    for ax in axes.flat[panels:]:
        ax.set_axis_off()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        az.plot_rank(idata, var_names=["z"], coords=coords, kind="bars", ax=axes.flat[:panels],
                     labeller=az.labels.DimCoordLabeller())
    fig.suptitle("NUTS rank histograms, one row per chain: flat = the chains agree")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_prior_vs_posterior(idata: az.InferenceData, path, max_obs: int = 3, max_latents: int = 4) -> Path:
    """Marginal densities of p(z_j) and of each method's posterior draws, one panel per (latent, data point)."""
    import matplotlib.pyplot as plt
    from scipy.stats import gaussian_kde

    from ..plots import save_figure

    coords = _selection(idata, max_obs, max_latents)
    post = idata.posterior["z"]
    prior = idata.prior["z"]
    methods = [m for m in ("guide", "optimised", "nuts") if m in post["inference"].values]
    rows, cols = coords["latent"], coords["obs"]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(3.2 * len(cols), 2.2 * len(rows)), squeeze=False)
    for i, lat in enumerate(rows):
        p = _thin(prior.sel(latent=lat).values.reshape(-1), 4000)
        for j, o in enumerate(cols):
            ax = axes[i, j]
            series = {m: _thin(post.sel(inference=m, obs=o, latent=lat).values.reshape(-1), 2000) for m in methods}
            post_all = np.concatenate(list(series.values()))
            lo, hi = np.percentile(np.concatenate([p, post_all]), [0.5, 99.5])
            grid = np.linspace(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo), 300)
            for name, values in [("prior", p), *series.items()]:
                if np.ptp(values) <= 0:
                    continue
                density = gaussian_kde(values)(grid)
                if name == "prior":
                    ax.fill_between(grid, density, color=_COLOURS[name], alpha=0.35, lw=0)
                else:
                    ax.plot(grid, density, color=_COLOURS[name], lw=1.4, ls="--" if name == "optimised" else "-")
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"data point {o}{_obs_label(idata, o)}", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"z[{lat}]")
    handles = [plt.Line2D([], [], color=_COLOURS["prior"], lw=6, alpha=0.5, label="prior p(z)")]
    handles += [plt.Line2D([], [], color=_COLOURS[m], ls="--" if m == "optimised" else "-", label=_label(m))
                for m in methods]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle("prior against posterior, per latent (rows) and data point (columns)")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return save_figure(fig, path)


def plot_posterior_predictive(idata: az.InferenceData, path, max_obs: int = 8, n_draws: int = 5) -> Path:
    """Per data point (rows): the observed image, E[x|z] averaged over each method's draws, then E[x|z] at
    single NUTS draws (chain 0, evenly spaced)."""
    import matplotlib.pyplot as plt

    from ..plots import save_figure

    shape = tuple(int(s) for s in idata.attrs["image_shape"])
    pp = idata.posterior_predictive["x_mean"]
    observed = idata.observed_data["x"]
    obs = idata.posterior["obs"].values[:max_obs]
    methods = [m for m in ("guide", "optimised", "nuts") if m in pp["inference"].values]
    draws = _thin(pp["draw"].values, n_draws)
    titles = ["observed"] + [f"{_label(m).split(' (')[0]}\nmean E[x|z]" for m in methods]
    titles += [f"NUTS draw {d}" for d in draws]
    lo = float(min(observed.min(), pp.min()))
    hi = float(max(observed.max(), pp.max()))
    vmin, vmax = (0.0, 1.0) if lo >= 0 and hi <= 1 else (lo, hi)
    aspect = shape[1] / shape[0]
    cell = 1.3 if aspect < 4 else 0.25
    fig, axes = plt.subplots(len(obs), len(titles), squeeze=False,
                             figsize=(max(1.2 * len(titles), 1.3 * len(titles) * min(aspect, 4) / 2),
                                      cell * len(obs) + 0.9))
    for i, o in enumerate(obs):
        images = [observed.sel(obs=o).values]
        images += [pp.sel(inference=m, obs=o).mean(("chain", "draw")).values for m in methods]
        images += [pp.sel(inference="nuts", obs=o, chain=pp["chain"].values[0], draw=d).values for d in draws]
        for j, img in enumerate(images):
            ax = axes[i, j]
            ax.imshow(np.asarray(img).reshape(shape), cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest",
                      aspect="auto" if aspect >= 4 else "equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=8)
            if j == 0:
                ax.set_ylabel(f"obs {o}{_obs_label(idata, o).replace(' (label ', chr(10) + 'label ').replace(')', '')}",
                              fontsize=8)
    fig.suptitle("posterior predictive: decoded E[x | z]", y=1.0)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figures(idata: az.InferenceData, folder, max_pairs: int = 3) -> dict[str, Path]:
    """All the figures: pair plots (one per data point, up to ``max_pairs``), trace, rank, prior against
    posterior, posterior predictive."""
    folder = Path(folder)
    paths = {}
    for o in idata.posterior["obs"].values[:max_pairs]:
        paths[f"pair_{o}"] = plot_pair(idata, o.item(), folder / f"pair_obs{o}.png")
    paths["trace"] = plot_trace(idata, folder / "trace.png")
    paths["rank"] = plot_rank(idata, folder / "rank.png")
    paths["prior_vs_posterior"] = plot_prior_vs_posterior(idata, folder / "prior_vs_posterior.png")
    paths["posterior_predictive"] = plot_posterior_predictive(idata, folder / "posterior_predictive.png")
    return paths


# --------------------------------------------------------------------------- a run directory


def analyze_run(run_path, out=None, *, split: str = "test", obs: int | None = None, indices=None,
                num_chains: int = 4, num_draws: int = 500, warmup: int = 500, seed: int = 0, optimise: bool = True,
                num_particles: int = 5000, dense_mass: bool = False, figures: bool = True, progress: bool = True):
    """Analyse data points of a run directory's ``split`` and write the files of :func:`save_analysis` to
    ``out`` (default ``RUN/analysis``). ``indices`` picks data points by position in the split; else
    ``obs`` (default 4) of them are drawn at random from seed ``seed``. Returns (analysis, paths).

    Everything is checked before any sampling: the counts, the run directory, the prior's support,
    the split, the indices."""
    from ..data import SPLITS
    from ..run_dir import load_run

    check_positive(num_chains=num_chains, num_draws=num_draws, num_particles=num_particles)
    if not isinstance(warmup, int) or warmup < 0:
        raise PyroVAEError(f"warmup must be a non-negative integer, got {warmup!r}")
    if indices is not None and obs is not None:
        raise PyroVAEError("give either obs (how many data points) or indices (which ones), not both")
    if split not in SPLITS:
        raise PyroVAEError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if obs is not None:
        check_positive(obs=obs)
    run = load_run(run_path)
    check_nuts_support(run.vae)
    _, x_all, labels_all = held_out(run, split)  # binarized as in training, where it was
    n = len(x_all)
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
    else:
        count = 4 if obs is None else obs
        if count > n:
            raise PyroVAEError(f"obs={count} but the {split} split has {n} data points")
        gen = torch.Generator().manual_seed(seed)
        indices = sorted(torch.randperm(n, generator=gen)[:count].tolist())
    x = x_all[indices]
    labels = None if labels_all is None else labels_all[indices].tolist()
    out = Path(out) if out is not None else run.path / "analysis"
    if out.exists() and not out.is_dir():
        raise PyroVAEError(f"{out} exists and is not a directory")
    attrs = {"run": str(run.path), "split": split, "dataset": run.config.dataset, "prior_name": run.config.prior}
    analysis = analyze(run.vae, x, indices, labels, num_chains=num_chains, num_draws=num_draws, warmup=warmup,
                       seed=seed, optimise=optimise, num_particles=num_particles, dense_mass=dense_mass,
                       progress=progress, attrs=attrs)
    _say(progress, f"writing {out}/")
    paths = save_analysis(analysis, out, figures=figures)
    return analysis, paths


__all__ = ["Analysis", "analyze", "analyze_run", "compute_gaps", "build_inference_data", "summarize",
           "format_report", "save_analysis", "save_inference_data", "load_inference_data", "save_figures",
           "plot_pair", "plot_trace", "plot_rank", "plot_prior_vs_posterior", "plot_posterior_predictive",
           "chunked_log_weights", "METHODS"]
