"""Figures, written atomically as PNG files."""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .run_dir import atomic_write_bytes  # noqa: E402
from .seeding import seeded  # noqa: E402


def save_figure(fig, path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def image_grid(images: torch.Tensor, image_shape, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile (N, D) images into one 2-D array, ``ncol`` per row, with a light border."""
    images = images.detach().cpu().float().reshape(-1, *image_shape).numpy()
    n = len(images)
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    h, w = image_shape
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad), 0.5, dtype=np.float32)
    for k, img in enumerate(images):
        r, c = divmod(k, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    return grid


def plot_images(images: torch.Tensor, image_shape, path, title: str = "", ncol: int | None = None) -> Path:
    grid = image_grid(images, image_shape, ncol)
    fig, ax = plt.subplots(figsize=(min(12, 1 + grid.shape[1] / 25), min(12, 1 + grid.shape[0] / 25)))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title)
    return save_figure(fig, path)


def plot_samples(vae, path, n: int = 64, title: str = "decoded samples z ~ p(z)") -> Path:
    return plot_images(vae.sample(n), vae.image_shape, path, title)


def plot_reconstructions(vae, x: torch.Tensor, path, n: int = 32) -> Path:
    """Inputs in the odd columns, their reconstructions E[x | z = mean of q(z | x)] right beside them."""
    x = x[:n]
    pairs = torch.stack([x, vae.reconstruct(x)], dim=1).reshape(2 * len(x), -1)
    return plot_images(pairs, vae.image_shape, path, "input | reconstruction", ncol=16)


def plot_learning_curves(history: list[dict], path) -> Path:
    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [-r["train_loss"] for r in history], label="train (beta-)ELBO")
    ax.plot(epochs, [r["valid_elbo"] for r in history], label="validation ELBO")
    if history:
        best = max(history, key=lambda r: r.get("valid_beta_elbo", r["valid_elbo"]))
        ax.axvline(best["epoch"], color="grey", ls=":", label=f"best epoch {best['epoch']}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per data point")
    ax.legend()
    ax.set_title("learning curves")
    return save_figure(fig, path)


def draw_latent_space(ax, vae, x: torch.Tensor, labels: torch.Tensor | None, grid_size: int = 200,
                      title: str | None = None):
    """Posterior means coloured by label, on ``ax``: over the prior's log-density contours when z is
    2-D, else projected on their first two principal components. Returns the scatter."""
    z = vae.encode(x).cpu().numpy()
    if vae.latent_dim == 2:
        lo, hi = np.percentile(z, 0.5, axis=0), np.percentile(z, 99.5, axis=0)
        span = np.maximum(hi - lo, 1e-3)
        lo, hi = np.minimum(lo - 0.2 * span, -3), np.maximum(hi + 0.2 * span, 3)
        g0, g1 = np.meshgrid(np.linspace(lo[0], hi[0], grid_size), np.linspace(lo[1], hi[1], grid_size))
        grid = torch.as_tensor(np.stack([g0.ravel(), g1.ravel()], -1), dtype=torch.float32, device=vae.device)
        with torch.no_grad():
            prior = vae.prior()
            inside = prior.support.check(grid)
            logp = torch.where(inside, prior.log_prob(torch.where(inside[..., None], grid, prior.sample())),
                               torch.tensor(-math.inf, device=grid.device))
        logp = logp.cpu().numpy().reshape(grid_size, grid_size)
        finite = np.isfinite(logp)
        if finite.any() and np.ptp(logp[finite]) > 1e-6:
            levels = np.linspace(np.percentile(logp[finite], 5), logp[finite].max(), 10)
            ax.contour(g0, g1, np.where(finite, logp, logp[finite].min()), levels=levels, cmap="Greys",
                       linewidths=0.8)
        elif finite.any():  # a flat density: draw the edge of its support
            ax.contour(g0, g1, finite.astype(float), levels=[0.5], colors="grey", linewidths=0.8)
        else:  # the support is a curve (sphere, simplex): show where prior samples fall
            with torch.no_grad():
                zp = prior.sample((2000,)).cpu().numpy()
            ax.scatter(zp[:, 0], zp[:, 1], s=2, c="lightgrey", label="prior samples")
        ax.set_xlabel("z1")
        ax.set_ylabel("z2")
        default_title = "posterior means over the prior's log-density"
    else:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2).fit(z)
        z = pca.transform(z)
        ax.set_xlabel(f"PC1 ({pca.explained_variance_ratio_[0]:.0%})")
        ax.set_ylabel(f"PC2 ({pca.explained_variance_ratio_[1]:.0%})")
        default_title = f"posterior means (d={vae.latent_dim}), first two principal components"
    if labels is None:
        sc = ax.scatter(z[:, 0], z[:, 1], s=6, alpha=0.8)
    else:
        sc = ax.scatter(z[:, 0], z[:, 1], c=labels.cpu().numpy(), cmap="tab10", s=6, alpha=0.8)
    ax.set_title(title or default_title)
    return sc


def plot_latent_space(vae, x: torch.Tensor, labels: torch.Tensor | None, path, grid_size: int = 200) -> Path:
    fig, ax = plt.subplots(figsize=(6, 5))
    sc = draw_latent_space(ax, vae, x, labels, grid_size)
    if labels is not None:
        fig.colorbar(sc, ax=ax, label="label")
    return save_figure(fig, path)


def plot_image_rows(rows: dict, image_shape, path, title: str = "") -> Path:
    """One labelled row of images per entry of ``rows`` (label -> (n, D) images)."""
    labels = list(rows)
    grids = [image_grid(rows[k], image_shape, ncol=len(rows[k])) for k in labels]
    width = max(g.shape[1] for g in grids)
    fig, axes = plt.subplots(len(grids), 1, figsize=(min(14, 1.5 + width / 18), 0.4 + 0.9 * len(grids)),
                             squeeze=False)
    for ax, label, grid in zip(axes[:, 0], labels, grids):
        ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def save_run_figures(run, data, test_x: torch.Tensor) -> None:
    """The standard figures of a run directory: samples, reconstructions, learning curves, latent space.

    Test images are shown in a fixed random order: some datasets' files are sorted by class."""
    figures = run.figures
    vae = run.vae
    order = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(0))[:2000]
    with seeded(run.config.seed, vae.device):
        plot_samples(vae, figures / "samples.png")
    plot_reconstructions(vae, test_x[order.to(test_x.device)], figures / "reconstructions.png")
    plot_learning_curves(run.history, figures / "learning_curves.png")
    labels = None if data.test_labels is None else data.test_labels[order]
    plot_latent_space(vae, test_x[order.to(test_x.device)], labels, figures / "latent_space.png")
