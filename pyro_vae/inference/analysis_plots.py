"""Figures of a posterior analysis, drawn from its InferenceData: pair plots of guide against NUTS
draws, ArviZ trace and rank plots, prior against posterior, and the posterior predictive."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from ..plots import save_figure  # first: it sets matplotlib's Agg backend
from .idata import az

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is set)

_COLOURS = {"prior": "0.6", "guide": "C1", "optimised": "C2", "nuts": "k"}


def informative_latents(idata: az.InferenceData, obs, k: int = 4) -> list[int]:
    """The k latents whose NUTS posterior is narrowest relative to the prior's spread (at ``obs``, a value
    or a list of values of the obs coordinate), in index order: those the data inform most."""
    z = idata.posterior["z"].sel(inference="nuts", obs=obs)
    sd = z.std(("chain", "draw"))
    if "obs" in sd.dims:
        sd = sd.mean("obs")
    prior_sd = _prior_draws(idata).std(("chain", "draw"))
    ratio = (sd / prior_sd).values
    return sorted(int(i) for i in np.argsort(ratio, kind="stable")[:k])


def _prior_draws(idata):
    """The prior's draws of z, (chain, draw, latent): the prior group repeats them under every (inference, obs)."""
    z = idata.prior["z"]
    return z.isel({dim: 0 for dim in ("inference", "obs") if dim in z.dims})


def _thin(a: np.ndarray, n: int) -> np.ndarray:
    return a[np.linspace(0, len(a) - 1, min(n, len(a))).round().astype(int)]


def plot_pair(idata: az.InferenceData, obs, path, max_latents: int = 4, points: int = 800) -> Path:
    """Pair plot at one data point: the guides' draws over NUTS draws, for the most informed latents."""
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


def _shown(idata, coords) -> str:
    """' (data points a, b of N)' when a figure shows fewer data points than were analysed."""
    total = idata.posterior.sizes["obs"]
    shown = coords["obs"]
    return "" if len(shown) == total else f" (data points {', '.join(map(str, shown))}: {len(shown)} of {total})"


def plot_trace(idata: az.InferenceData, path, max_obs: int = 6, max_latents: int = 3) -> Path:
    """ArviZ trace plot of the NUTS chains (one colour per chain) for a few data points and latents."""
    coords = _selection(idata, max_obs, max_latents)
    with warnings.catch_warnings():  # ArviZ: few draws; matplotlib: ArviZ uses an API it deprecates
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        axes = az.plot_trace(idata, var_names=["z"], coords=coords, compact=False, legend=False,
                             labeller=az.labels.DimCoordLabeller(), backend_kwargs={"layout": "constrained"})
    fig = np.atleast_2d(axes)[0, 0].figure
    fig.suptitle("NUTS chains (one colour each): densities and traces" + _shown(idata, coords))
    return save_figure(fig, path)


def plot_rank(idata: az.InferenceData, path, max_obs: int = 6, max_latents: int = 3) -> Path:
    """ArviZ rank plot of the NUTS chains: flat, overlapping histograms mean the chains agree."""
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
    fig.suptitle("NUTS rank histograms, one row per chain: flat = the chains agree" + _shown(idata, coords))
    fig.tight_layout()
    return save_figure(fig, path)


def plot_prior_vs_posterior(idata: az.InferenceData, path, max_obs: int = 3, max_latents: int = 4) -> Path:
    """Marginal densities of p(z_j) and of each method's posterior draws, one panel per (latent, data point)."""
    from scipy.stats import gaussian_kde

    coords = _selection(idata, max_obs, max_latents)
    post = idata.posterior["z"]
    prior = _prior_draws(idata)
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
    fig.suptitle("prior against posterior, per latent (rows) and data point (columns)" + _shown(idata, coords))
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return save_figure(fig, path)


def plot_posterior_predictive(idata: az.InferenceData, path, max_obs: int = 8, n_draws: int = 5) -> Path:
    """Per data point (rows): the observed image, E[x|z] averaged over each method's draws, then E[x|z] at
    single NUTS draws (chain 0, evenly spaced)."""
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


__all__ = ["save_figures", "plot_pair", "plot_trace", "plot_rank", "plot_prior_vs_posterior",
           "plot_posterior_predictive", "informative_latents"]
