"""The study's figures: one home for the pictures that compare runs (samples, ex-post samples,
reconstructions, interpolations, aggregate posteriors, curves against beta)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from pyro.distributions import constraints

from ..inference.evaluate import ex_post_mixture
from ..plots import (draw_latent_space, plot_image_rows, plot_prior_parameters,  # first: it sets the Agg backend
                     save_figure)
from ..run_dir import load_run
from ..seeding import seeded
from ..subsets import describe, random_subset
from .settings import Setting, stale_fields

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is set)


def study_figures(group: list[Setting], out: Path, figures: Path, d: int) -> dict[str, Path]:
    """The study's figures for one latent size: samples from each prior and from the ex-post mixture,
    reconstructions, interpolations, and the aggregate posterior."""
    runs = {s.label: _load(out, s) for s in group}
    any_run = next(iter(runs.values()))
    x_all, y_all = any_run.split("test")
    shown = random_subset(len(x_all), FIGURE_POINTS, FIGURE_SEED)  # never the file's first images: it may be sorted
    x, y = shown.take(x_all), None if y_all is None else shown.take(y_all)
    which = f"test images: {describe(shown.record())}"
    shape = any_run.vae.image_shape
    made = {}
    with seeded(0, x.device):
        made["samples from each prior"] = plot_image_rows(
            {lab: r.vae.sample(12) for lab, r in runs.items()}, shape, figures / f"samples-z{d}.png",
            f"E[x | z] (the decoder's mean) for z ~ p(z), latent size {d}")
        made["samples from the ex-post mixture"] = plot_image_rows(
            {lab: r.vae.decode(ex_post_mixture(r).sample(12)) for lab, r in runs.items()}, shape,
            figures / f"ex-post-samples-z{d}.png",
            f"E[x | z] for z ~ a Gaussian mixture fitted to the codes, latent size {d}")
    recon = {"data": x[:12]}
    recon.update({lab: r.vae.reconstruct(x[:12]) for lab, r in runs.items()})
    made["reconstructions"] = plot_image_rows(recon, shape, figures / f"reconstructions-z{d}.png",
                                              f"test images and their reconstructions, latent size {d} (the first 12 of {which})")
    ends = {"endpoints": torch.cat([x[:1], torch.full_like(x[:8], 0.5), x[1:2]])}
    made["latent interpolations"] = plot_image_rows(
        {**ends, **{lab: _interpolate(r.vae, x[0], x[1]) for lab, r in runs.items()}}, shape,
        figures / f"interpolations-z{d}.png", f"two test images (first row, at the ends) and E[x | z] along "
        f"the line between their codes, latent size {d} (the first two of {which})")
    ncol = min(4, len(runs))
    nrow = math.ceil(len(runs) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.8 * nrow), squeeze=False)
    for i, (ax, (lab, r)) in enumerate(zip(axes.ravel(), runs.items())):  # one legend, beside the last panel
        draw_latent_space(ax, r.vae, x[:1000], None if y is None else y[:1000], grid_size=120, title=lab,
                          legend=i == len(runs) - 1)
    for ax in axes.ravel()[len(runs):]:
        ax.set_axis_off()
    dims = {r.vae.latent_dim for r in runs.values()}  # a shifted run (latent_dim d + n) is drawn as a projection
    title = ("aggregate posterior (codes of test images) over each prior's density" if dims == {2} else
             "codes of test images (first two principal components) over prior draws projected the same way"
             if 2 not in dims else "aggregate posterior over each prior's density (2-D latents); for the others, "
             "codes and prior draws on their first two principal components")
    fig.suptitle(f"{title}\n({which})")
    fig.tight_layout()
    made["aggregate posterior"] = save_figure(fig, figures / f"aggregate-posterior-z{d}.png")
    for lab, r in runs.items():  # learned priors: mixture means and weights, pseudo-inputs
        path = plot_prior_parameters(r.vae, figures / f"prior-{lab.replace(':', '_')}-z{d}.png")
        if path is not None:
            made[f"the learned prior {lab}"] = path
    return made


FIGURE_POINTS = 1000
FIGURE_SEED = 0
"""The study's figures show test images of one random subset (:func:`~pyro_vae.subsets.random_subset`): the
codes of its 1,000 images in the aggregate-posterior panels, its first 12 reconstructed, its first two
interpolated; the report says which."""


def _load(out: Path, setting: Setting):
    """A setting's run; a prior of the user's own is imported when the run's config names the prior the
    setting does (the caller named it), never because a run directory alone says so."""
    return load_run(out / "runs" / setting.name, trust=not stale_fields(out, setting))


def _interpolate(vae, xa: torch.Tensor, xb: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """Decode points on the segment between two codes, projected back onto the prior's support."""
    za, zb = vae.encode(xa[None]), vae.encode(xb[None])
    t = torch.linspace(0, 1, steps, device=za.device)[:, None]
    z = (1 - t) * za + t * zb
    if vae.prior().support is constraints.sphere:
        z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return vae.decode(z)


def beta_plot(rows: list[tuple[float, dict]], path: Path) -> Path:
    """Rate-distortion, sample quality, hole score and sharpness against beta, from (beta, report row) pairs."""
    rows = sorted(rows, key=lambda r: r[0])
    betas = [b for b, _ in rows]
    xs = [max(b, 1e-2) for b in betas]  # beta = 0 drawn at the left edge of a log axis
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    axes[0].plot([r["rate"] for _, r in rows], [r["distortion"] for _, r in rows], "o-")
    for b, (_, r) in zip(betas, rows):
        axes[0].annotate(f"β={b:g}", (r["rate"], r["distortion"]), fontsize=8)
    axes[0].set(xlabel="rate (nats)", ylabel="distortion (nats)", title="rate-distortion")
    if "fd_prior" in rows[0][1]:
        axes[1].plot(xs, [r["fd_prior"] for _, r in rows], "o-", label="prior samples")
        axes[1].plot(xs, [r["fd_ex_post"] for _, r in rows], "s--", label="ex-post samples")
        axes[1].axhline(rows[0][1]["fd_test"], color="grey", ls=":", label="test vs test")
        axes[1].set(ylabel="Frechet distance", title="sample quality (lower is better)")
        axes[1].legend()
    axes[2].plot(xs, [r["hole_score"] for _, r in rows], "o-")
    axes[2].set(ylabel="hole score", title="prior mass where no data point encodes")
    axes[3].plot(xs, [r["sharp_recon"] for _, r in rows], "o-", label="reconstructions")
    axes[3].plot(xs, [r["sharp_samples"] for _, r in rows], "s--", label="prior samples")
    axes[3].axhline(1.0, color="grey", ls=":", label="data")
    axes[3].set(ylabel="sharpness", title="blur (1 = as sharp as the data)")
    axes[3].legend()
    for ax in axes[1:]:
        ax.set_xscale("log")
        ax.set_xlabel("beta (0 drawn at 0.01)")
    fig.tight_layout()
    return save_figure(fig, path)
