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
from .subsets import describe, random_subset  # noqa: E402


def save_figure(fig, path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def image_grid(images: torch.Tensor, image_shape, ncol: int | None = None, pad: int = 1, group: int = 1,
               gap: int = 0) -> np.ndarray:
    """Tile (N, D) images into one 2-D array, ``ncol`` per row, with a light border; ``gap`` more pixels
    (white) after every ``group`` images in a row, so that groups (an input and its reconstruction) stand apart."""
    images = images.detach().cpu().float().reshape(-1, *image_shape).numpy()
    n = len(images)
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    h, w = image_shape
    gaps = (ncol - 1) // group * gap if gap else 0
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad + gaps), 0.5, dtype=np.float32)
    for k, img in enumerate(images):
        r, c = divmod(k, ncol)
        left = pad + c * (w + pad) + (c // group) * gap
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, left : left + w] = img
        if gap and c % group == group - 1 and c < ncol - 1:
            grid[:, left + w + pad : left + w + pad + gap] = 1.0
    return grid


def plot_images(images: torch.Tensor, image_shape, path, title: str = "", ncol: int | None = None, group: int = 1,
                gap: int = 0) -> Path:
    grid = image_grid(images, image_shape, ncol, group=group, gap=gap)
    fig, ax = plt.subplots(figsize=(min(12, 1 + grid.shape[1] / 25), min(12, 1 + grid.shape[0] / 25)))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title)
    return save_figure(fig, path)


SAMPLES_TITLE = "E[x | z], the decoder's mean image, for z ~ p(z) (not draws x ~ p(x | z))"


def plot_samples(vae, path, n: int = 64, title: str = SAMPLES_TITLE) -> Path:
    return plot_images(vae.sample(n), vae.image_shape, path, title)


def plot_reconstructions(vae, x: torch.Tensor, path, n: int = 32, what: str = "") -> Path:
    """Pairs, set apart by white gaps: an input, then its reconstruction E[x | z = the centre of q(z | x)],
    for the first ``n`` rows of ``x`` (the caller chooses them: a random subset, never a file's prefix);
    ``what`` says which images they are, in the title."""
    x = x[:n]
    pairs = torch.stack([x, vae.reconstruct(x)], dim=1).reshape(2 * len(x), -1)
    gap = max(2, vae.image_shape[1] // 3)
    title = "pairs: input, reconstruction E[x | z = centre of q(z|x)]" + (f"\n{what}" if what else "")
    return plot_images(pairs, vae.image_shape, path, title, ncol=16, group=2, gap=gap)


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
                      title: str | None = None, legend: bool = True):
    """Posterior means coloured by label, on ``ax``, with a legend for the colours and the prior:

    d = 2   over the prior's log-density contours (10 levels, from its 5th percentile on the grid to its
            maximum), the axes spanning at least [-3, 3]
    d > 2   projected on the codes' first two principal components, over prior draws projected the same
            way, and the axes span the prior's draws as well as the codes: the prior's scale, so that a
            collapsed posterior (every code at the prior's centre) looks collapsed"""
    z = vae.encode(x).cpu().numpy()
    with torch.no_grad():
        prior = vae.prior()
    handles = []
    if vae.latent_dim == 2:
        handles += _draw_prior_2d(ax, prior, z, grid_size, vae.device)
        ax.set_xlabel("z1")
        ax.set_ylabel("z2")
        default_title = "posterior means over the prior's log-density"
    else:
        from sklearn.decomposition import PCA

        with torch.no_grad():
            zp = prior.sample((2000,)).cpu().numpy()
        pca = PCA(n_components=2).fit(z if np.ptp(z, axis=0).max() > 1e-6 else zp)
        zp, z = pca.transform(zp), pca.transform(z)
        ax.scatter(zp[:, 0], zp[:, 1], s=3, c="0.85", zorder=0)
        handles.append(plt.Line2D([], [], color="0.75", marker="o", ls="", label="prior draws, projected"))
        both = np.concatenate([z, zp])
        lo, hi = np.percentile(both, 0.5, axis=0), np.percentile(both, 99.5, axis=0)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_xlabel(f"PC1 of the codes ({pca.explained_variance_ratio_[0]:.0%})")
        ax.set_ylabel(f"PC2 ({pca.explained_variance_ratio_[1]:.0%})")
        default_title = f"posterior means (d={vae.latent_dim}) on the prior's scale"
    if labels is None:
        sc = ax.scatter(z[:, 0], z[:, 1], s=6, alpha=0.8, color="C0")
        handles.append(plt.Line2D([], [], color="C0", marker="o", ls="", label="codes of test images"))
    else:
        values = labels.cpu().numpy()
        sc = ax.scatter(z[:, 0], z[:, 1], c=values, cmap="tab10", vmin=-0.5, vmax=9.5, s=6, alpha=0.8)
        for k in np.unique(values)[:10]:
            handles.append(plt.Line2D([], [], color=plt.get_cmap("tab10")(int(k) % 10), marker="o", ls="",
                                      label=f"label {int(k)}"))
    if legend:  # beside the axes, not over the codes it explains
        ax.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                  framealpha=0.8, ncol=2 if len(handles) > 12 else 1)
    ax.set_title(title or default_title)
    return sc


def _draw_prior_2d(ax, prior, z: np.ndarray, grid_size: int, device) -> list:
    """The prior over a 2-D latent space (contours, the edge of its support, or its draws); legend handles."""
    lo, hi = np.percentile(z, 0.5, axis=0), np.percentile(z, 99.5, axis=0)
    span = np.maximum(hi - lo, 1e-3)
    lo, hi = np.minimum(lo - 0.2 * span, -3), np.maximum(hi + 0.2 * span, 3)
    g0, g1 = np.meshgrid(np.linspace(lo[0], hi[0], grid_size), np.linspace(lo[1], hi[1], grid_size))
    grid = torch.as_tensor(np.stack([g0.ravel(), g1.ravel()], -1), dtype=torch.float32, device=device)
    with torch.no_grad():
        inside = prior.support.check(grid)
        logp = torch.where(inside, prior.log_prob(torch.where(inside[..., None], grid, prior.sample())),
                           torch.tensor(-math.inf, device=grid.device))
    logp = logp.cpu().numpy().reshape(grid_size, grid_size)
    finite = np.isfinite(logp)
    if finite.any() and np.ptp(logp[finite]) > 1e-6:
        levels = np.linspace(np.percentile(logp[finite], 5), logp[finite].max(), 10)
        ax.contour(g0, g1, np.where(finite, logp, logp[finite].min()), levels=levels, cmap="Greys", linewidths=0.8)
        return [plt.Line2D([], [], color="0.4", lw=0.8,
                           label=f"log p(z): 10 levels, {levels[0]:.1f} to {levels[-1]:.1f}")]
    if finite.any():  # a flat density: draw the edge of its support
        ax.contour(g0, g1, finite.astype(float), levels=[0.5], colors="grey", linewidths=0.8)
        return [plt.Line2D([], [], color="grey", lw=0.8, label="edge of the prior's support (flat density)")]
    with torch.no_grad():  # the support is a curve (sphere, simplex): show where prior samples fall
        zp = prior.sample((2000,)).cpu().numpy()
    ax.scatter(zp[:, 0], zp[:, 1], s=2, c="lightgrey")
    return [plt.Line2D([], [], color="lightgrey", marker="o", ls="", label="prior draws")]


def plot_latent_space(vae, x: torch.Tensor, labels: torch.Tensor | None, path, grid_size: int = 200) -> Path:
    fig, ax = plt.subplots(figsize=(7.4, 5.5))
    draw_latent_space(ax, vae, x, labels, grid_size)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_prior_parameters(vae, path) -> Path | None:
    """A learned prior's parameters, where it has some to show: a mixture's means (sized by weight) and
    weights; the VampPrior's pseudo-inputs as images. None for other priors."""
    prior = vae.prior
    if hasattr(prior, "raw_pseudo_inputs"):
        u = prior.pseudo_inputs.detach()[:64]
        return plot_images(u, vae.image_shape, path,
                           f"VampPrior pseudo-inputs u_k (first {len(u)} of {prior.raw_pseudo_inputs.shape[0]}): "
                           "p(z) = mean_k q(z | u_k)")
    if hasattr(prior, "means") and hasattr(prior, "logits"):
        means = prior.means.detach().cpu().numpy()
        weights = torch.softmax(prior.logits.detach(), -1).cpu().numpy()
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        if means.shape[1] > 2:
            from sklearn.decomposition import PCA

            means = PCA(n_components=2).fit_transform(means) if len(means) > 2 else means[:, :2]
        left.scatter(means[:, 0], means[:, -1] if means.shape[1] > 1 else np.zeros(len(means)),
                     s=2000 * weights, alpha=0.6, label="component mean (area = weight)")
        left.set(xlabel="z1" if vae.latent_dim <= 2 else "PC1", ylabel="z2" if vae.latent_dim <= 2 else "PC2",
                 title="mixture means")
        left.legend(fontsize=8)
        order = np.argsort(-weights)
        right.bar(np.arange(len(weights)), weights[order], label="weights, sorted")
        right.axhline(1 / len(weights), color="grey", ls=":", label="uniform")
        right.set(xlabel="component (by weight)", ylabel="weight", title="mixture weights")
        right.legend(fontsize=8)
        fig.tight_layout()
        return save_figure(fig, path)
    return None


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
    shown = random_subset(len(test_x), 2000, 0)
    with seeded(run.config.seed, vae.device):
        plot_samples(vae, figures / "samples.png")
    plot_reconstructions(vae, shown.take(test_x), figures / "reconstructions.png",
                         what=f"test images: {describe(shown.record())}")
    plot_learning_curves(run.history, figures / "learning_curves.png")
    labels = None if data.test_labels is None else shown.take(data.test_labels)
    plot_latent_space(vae, shown.take(test_x), labels, figures / "latent_space.png")
    plot_prior_parameters(vae, figures / "prior.png")
