"""The study: the same VAE under several priors, or several KL weights beta, measured and reported.

    compare     one run per (prior, latent size, seed): what the prior changes
    sweep-beta  one run per (beta, latent size, seed): beta = 0 is the autoencoder without the KL pull

Each run lives in ``<out>/runs/<name>``; a run already finished and evaluated is skipped, an
interrupted one resumed, so a study started again picks up where it stopped. The report is
``<out>/report.md`` (and ``report.html``) with its figures in ``<out>/figures``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
from pyro.distributions import constraints
from tqdm.auto import tqdm

from .config import Config
from .errors import PyroVAEError
from .inference.evaluate import METRICS, PER_POINT, evaluate, held_out
from .inference.metrics import ExPostMixture
from .models.priors import PRIORS
from .plots import draw_latent_space, plot_image_rows, plt, save_figure
from .run_dir import CHECKPOINT, INFO, atomic_write_bytes, atomic_write_json, load_run, read_json
from .seeding import seeded


@dataclasses.dataclass
class Setting:
    """One cell of a study: a name, the config that trains it, and its labels in the report."""

    name: str
    config: Config
    label: str          # the prior or the beta
    latent_dim: int
    seed: int


def compare_settings(base: Config, priors: list[str], latent_dims: list[int], seeds: int) -> list[Setting]:
    unknown = [p for p in priors if p not in PRIORS and ":" not in p]
    if unknown:
        raise PyroVAEError(f"unknown priors {', '.join(unknown)}; choose from {', '.join(PRIORS)}")
    return [Setting(f"{p.replace(':', '_')}-z{d}-s{s}", dataclasses.replace(base, prior=p, latent_dim=d,
                                                                          seed=base.seed + s), p, d, s)
            for d in latent_dims for p in priors for s in range(seeds)]


def beta_settings(base: Config, betas: list[float], latent_dims: list[int], seeds: int) -> list[Setting]:
    if any(not b >= 0 for b in betas):
        raise PyroVAEError(f"every beta must be >= 0, got {betas}")
    return [Setting(f"beta{b:g}-z{d}-s{s}", dataclasses.replace(base, beta=b, latent_dim=d, seed=base.seed + s),
                    f"{b:g}", d, s)
            for d in latent_dims for b in betas for s in range(seeds)]


def run_study(kind: str, settings: list[Setting], out: str | Path, *, k: int = 1000, progress: bool = True,
              command: str = "") -> Path:
    """Train and evaluate every setting (skipping finished ones), then write the report."""
    from .inference.train import resume, train

    out = Path(out)
    check_settings(settings)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "study.json", {"kind": kind, "command": command, "k": k,
                                           "settings": [{"name": s.name, "label": s.label, "latent_dim": s.latent_dim,
                                                         "seed": s.seed, "config": s.config.to_dict()}
                                                        for s in settings]})
    bar = tqdm(settings, desc=f"{kind} study", unit="run", disable=not progress)
    for s in bar:
        bar.set_postfix_str(s.name)
        path = out / "runs" / s.name
        info = read_json(path / INFO) if (path / INFO).is_file() else {}
        if info.get("status") != "finished":
            if (path / CHECKPOINT).is_file() and info.get("status") in ("interrupted", "running"):
                resume(path, progress=False)
            else:
                if path.exists():  # a start that wrote nothing useful: begin again
                    _clear(path)
                train(s.config, path, progress=False)
        if not (path / METRICS).is_file():
            evaluate(load_run(path), num_particles=k, progress=False)
    bar.close()
    return write_report(kind, settings, out, command)


def check_settings(settings: list[Setting]) -> None:
    """Build every setting's model before training any: a bad combination (say, a sphere prior at a
    latent size its guide cannot take) fails at once, not after an hour of the other runs."""
    from .data import load_dataset
    from .models.vae import build_vae

    if not settings:
        raise PyroVAEError("the study has no settings")
    datasets = {}
    for s in settings:
        c = s.config.validate()
        key = (c.dataset, c.data_root)
        if key not in datasets:
            datasets[key] = load_dataset(c.dataset, c.data_root, download=c.download)
        data = datasets[key]
        try:
            build_vae(c, data.dim, data.image_shape, data.binary)
        except PyroVAEError as e:
            raise PyroVAEError(f"setting {s.name}: {e}") from None


def _clear(path: Path) -> None:
    for f in sorted(path.rglob("*"), reverse=True):
        f.rmdir() if f.is_dir() else f.unlink()
    path.rmdir()


# --------------------------------------------------------------------------- the report


def _metric_row(m: dict) -> dict:
    """The numbers a report row shows, from one run's metrics.json."""
    agg = m["aggregate_posterior"]
    row = {
        "loglik": m["log_likelihood"][0], "loglik_se": m["log_likelihood"][1],
        "elbo": m["elbo"][0], "rate": m["rate"][0], "distortion": m["distortion"][0],
        "active_units": m["active_units"], "mutual_information": agg["mutual_information"][0],
        "marginal_kl": agg["marginal_kl"][0], "hole_score": agg["hole_score"][0],
        "sharp_recon": m["sharpness"]["reconstructions"], "sharp_samples": m["sharpness"]["prior_samples"],
        "sharp_ex_post": m["sharpness"]["ex_post_samples"],
    }
    sq = m.get("sample_quality")
    if sq:
        row.update(fd_prior=sq["prior"]["frechet_distance"], fd_ex_post=sq["ex_post"]["frechet_distance"],
                   conf_prior=sq["prior"]["confidence"], fd_test=sq["test_images"]["frechet_distance"])
    return row


COLUMNS = [  # (key, header, format)
    ("loglik", "log p(x)", "{:.2f}"), ("paired", "vs first (paired)", None), ("elbo", "ELBO", "{:.2f}"),
    ("rate", "rate", "{:.2f}"), ("distortion", "distortion", "{:.2f}"), ("active_units", "active units", "{:.0f}"),
    ("mutual_information", "I(x;z)", "{:.2f}"), ("marginal_kl", "KL(q(z)‖p(z))", "{:.2f}"),
    ("hole_score", "hole score", "{:.3f}"), ("fd_prior", "FD prior samples", "{:.1f}"),
    ("fd_ex_post", "FD ex-post samples", "{:.1f}"), ("conf_prior", "confidence (prior samples)", "{:.2f}"),
    ("sharp_recon", "sharpness recon.", "{:.2f}"), ("sharp_samples", "sharpness samples", "{:.2f}"),
]


def _cell(values: list[float], fmt: str, se: list[float] | None = None) -> str:
    """One table cell: the value; with several seeds, mean +- sd across seeds; else +- its standard error."""
    if len(values) > 1:
        return f"{fmt.format(np.mean(values))} ± {fmt.format(np.std(values, ddof=1))}"
    if se:
        return f"{fmt.format(values[0])} ± {fmt.format(se[0])}"
    return fmt.format(values[0])


def _paired(out: Path, a: Setting, b: Setting) -> np.ndarray:
    """Per-test-point differences log p_b(x) - log p_a(x) (same test points, same order)."""
    la = np.load(out / "runs" / a.name / PER_POINT)
    lb = np.load(out / "runs" / b.name / PER_POINT)
    return lb - la


def table(out: Path, settings: list[Setting], latent_dim: int) -> tuple[list[str], list[list[str]]]:
    """The report's table for one latent size: a row per label, seeds pooled."""
    group = [s for s in settings if s.latent_dim == latent_dim]
    labels = list(dict.fromkeys(s.label for s in group))
    rows_by_label = {lab: [s for s in group if s.label == lab] for lab in labels}
    metrics = {s.name: _metric_row(json.loads((out / "runs" / s.name / METRICS).read_text())) for s in group}
    columns = [c for c in COLUMNS if c[0] == "paired" or all(c[0] in metrics[s.name] for s in group)]
    header = ["", *[c[1] for c in columns]]
    body = []
    reference = rows_by_label[labels[0]]
    for lab in labels:
        runs = rows_by_label[lab]
        cells = [lab]
        for key, _, fmt in columns:
            if key == "paired":
                if lab == labels[0]:
                    cells.append("—")
                    continue
                diffs = np.concatenate([_paired(out, r0, r1) for r0, r1 in zip(reference, runs)])
                cells.append(f"{diffs.mean():+.2f} ± {diffs.std(ddof=1) / math.sqrt(len(diffs)):.2f}")
                continue
            values = [metrics[r.name][key] for r in runs]
            se = [metrics[r.name]["loglik_se"] for r in runs] if key == "loglik" else None
            cells.append(_cell(values, fmt, se))
        body.append(cells)
    return header, body


def _markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def write_report(kind: str, settings: list[Setting], out: Path, command: str = "") -> Path:
    """report.md and report.html, with figures in ``out/figures``."""
    import markdown

    figures = out / "figures"
    first = settings[0].config
    what = "prior" if kind == "compare" else "beta"
    lines = [f"# pyro-vae study: {'prior comparison' if kind == 'compare' else 'beta sweep'} on {first.dataset}", ""]
    if command:
        lines += ["Regenerate with:", "", f"    {command}", ""]
    lines += [
        f"Architecture: {first.network} encoder/decoder, {first.hidden_layers} x {first.hidden_dim} hidden, "
        f"{first.likelihood} likelihood, guide {first.guide}; budget: at most {first.epochs} epochs (early stopping "
        f"patience {first.patience}), batch {first.batch_size}, lr {first.lr}; "
        f"seeds per setting: {len({s.seed for s in settings})}.",
        "",
        "Columns: test log p(x) (importance-weighted, ± standard error; with several seeds ± sd across seeds); "
        f"the paired per-test-point difference to the first {what} (± standard error); ELBO; rate "
        "KL(q(z|x)‖p(z)); distortion -E log p(x|z); active units; the mutual information and marginal KL of "
        "the aggregate posterior (ELBO surgery: rate = I + marginal KL); the prior-hole score (share of prior "
        "draws where the aggregate posterior has less density than at 99% of the data's codes); Frechet "
        "distance of decoded samples to test images in a reference classifier's feature space (prior samples, "
        "and ex-post Gaussian-mixture samples); the classifier's mean confidence on prior samples; sharpness "
        "(image-gradient energy over the data's: 1 = as sharp as the data).",
        "",
    ]
    for d in dict.fromkeys(s.latent_dim for s in settings):
        header, body = table(out, settings, d)
        lines += [f"## Latent size {d}", "", _markdown_table(header, body), ""]
        group = [s for s in settings if s.latent_dim == d and s.seed == settings[0].seed]
        for name, path in _figures(kind, group, out, figures, d).items():
            lines += [f"![{name}]({path.relative_to(out)})", ""]
    if kind == "sweep-beta":
        lines += _beta_findings(out, settings)
    text = "\n".join(lines)
    atomic_write_bytes(out / "report.md", text.encode())
    html = markdown.markdown(text, extensions=["tables"])
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>pyro-vae study</title><style>"
            "body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;"
            "font-size:90%}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}"
            f"</style></head><body>{html}</body></html>")
    atomic_write_bytes(out / "report.html", page.encode())
    return out / "report.md"


def _figures(kind: str, group: list[Setting], out: Path, figures: Path, d: int) -> dict[str, Path]:
    runs = {s.label: load_run(out / "runs" / s.name) for s in group}
    any_run = next(iter(runs.values()))
    data, x, y = held_out(any_run)
    shape = any_run.vae.image_shape
    made = {}
    with seeded(0, x.device):
        made["samples from each prior"] = plot_image_rows(
            {lab: r.vae.sample(12) for lab, r in runs.items()}, shape, figures / f"samples-z{d}.png",
            f"decoded z ~ p(z), latent size {d}")
        made["samples from the ex-post mixture"] = plot_image_rows(
            {lab: r.vae.decode(ExPostMixture(r.vae, data.train[:5000].to(x.device)).sample(12))
             for lab, r in runs.items()}, shape, figures / f"ex-post-samples-z{d}.png",
            f"decoded z ~ Gaussian mixture fitted to the codes, latent size {d}")
    recon = {"data": x[:12]}
    recon.update({lab: r.vae.reconstruct(x[:12]) for lab, r in runs.items()})
    made["reconstructions"] = plot_image_rows(recon, shape, figures / f"reconstructions-z{d}.png",
                                              f"test images and their reconstructions, latent size {d}")
    made["latent interpolations"] = plot_image_rows(
        {lab: _interpolate(r.vae, x[0], x[1]) for lab, r in runs.items()}, shape,
        figures / f"interpolations-z{d}.png", f"decoding the line between two test images' codes, latent size {d}")
    ncol = min(4, len(runs))
    nrow = math.ceil(len(runs) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.8 * nrow), squeeze=False)
    for ax, (lab, r) in zip(axes.ravel(), runs.items()):
        draw_latent_space(ax, r.vae, x[:1000], None if y is None else y[:1000], grid_size=120, title=lab)
    for ax in axes.ravel()[len(runs):]:
        ax.set_axis_off()
    title = "aggregate posterior (codes of test images) over each prior's density" if d == 2 else \
        "codes of test images, first two principal components"
    fig.suptitle(title)
    fig.tight_layout()
    made["aggregate posterior"] = save_figure(fig, figures / f"aggregate-posterior-z{d}.png")
    if kind == "sweep-beta":
        made["against beta"] = _beta_plot(out, group, figures / f"beta-z{d}.png")
    return made


def _interpolate(vae, xa: torch.Tensor, xb: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """Decode points on the segment between two codes, projected back onto the prior's support."""
    za, zb = vae.encode(xa[None]), vae.encode(xb[None])
    t = torch.linspace(0, 1, steps, device=za.device)[:, None]
    z = (1 - t) * za + t * zb
    if vae.prior().support is constraints.sphere:
        z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return vae.decode(z)


def _beta_plot(out: Path, group: list[Setting], path: Path) -> Path:
    rows = [(float(s.label), _metric_row(json.loads((out / "runs" / s.name / METRICS).read_text()))) for s in group]
    rows.sort()
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


def _beta_findings(out: Path, settings: list[Setting]) -> list[str]:
    """Plain statements of what the sweep measured, for the reader to check against the tables."""
    lines = ["## What the sweep measured", ""]
    for d in dict.fromkeys(s.latent_dim for s in settings):
        rows = sorted((float(s.label), _metric_row(json.loads((out / "runs" / s.name / METRICS).read_text())))
                      for s in settings if s.latent_dim == d and s.seed == settings[0].seed)
        (b0, r0), (b1, r1) = rows[0], next((r for r in rows if r[0] == 1.0), rows[-1])
        lines.append(f"- Latent size {d}: from β={b0:g} to β={b1:g} the hole score goes {r0['hole_score']:.3f} → "
                     f"{r1['hole_score']:.3f}, sharpness of prior samples {r0['sharp_samples']:.2f} → "
                     f"{r1['sharp_samples']:.2f}, of reconstructions {r0['sharp_recon']:.2f} → {r1['sharp_recon']:.2f}"
                     + (f", Frechet distance of prior samples {r0['fd_prior']:.1f} → {r1['fd_prior']:.1f}"
                        if "fd_prior" in r0 else "") + ".")
    return lines + [""]
