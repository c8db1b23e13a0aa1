"""The study's report: a table per latent size with paired differences, report.md and report.html,
with the figures of :mod:`pyro_vae.study.figures`. Everything it says comes from the run directories'
metrics.json and loglik_per_point.npy."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..inference.evaluate import health_warnings, likelihood_note
from ..run_dir import RunFiles, atomic_write_bytes
from ..subsets import describe
from .figures import beta_plot, study_figures
from .settings import Setting


def health(out: Path, setting: Setting) -> list[str]:
    """A run's warnings (collapse, not converged, not finished), from its metrics.json and run.json."""
    files = RunFiles(out / "runs" / setting.name)
    return health_warnings(files.read_info(), setting.config.epochs, files.read_metrics())


def metric_row(out: Path, setting: Setting) -> dict:
    """The numbers a report row shows, from one run's metrics.json."""
    m = RunFiles(out / "runs" / setting.name).read_metrics()
    agg = m["aggregate_posterior"]
    row = {
        "loglik": m["log_likelihood"][0], "loglik_se": m["log_likelihood"][1],
        **({"train_loglik": m["train_log_likelihood"][0]} if "train_log_likelihood" in m else {}),
        "elbo": m["elbo"][0], "rate": m["rate"][0], "distortion": m["distortion"][0],
        "active_units": m["active_units"], "mutual_information": agg["mutual_information"][0],
        "marginal_kl": agg["marginal_kl"][0], "hole_score": agg["hole_score"][0],
        "sharp_recon": m["sharpness"]["reconstructions"], "sharp_samples": m["sharpness"]["prior_samples"],
        "sharp_ex_post": m["sharpness"]["ex_post_samples"],
    }
    if "prior_gap" in m:
        row.update(prior_gap=m["prior_gap"]["gap"][0], prior_gap_se=m["prior_gap"]["gap"][1])
    if "mixture" in m:
        row["components_in_use"] = m["mixture"]["components_in_use"]
    if "parameters" in m:
        p = m["parameters"]
        row["parameters"] = f"{p['encoder']:,} / {p['decoder']:,} / {p['prior']:,}"
    sq = m.get("sample_quality")
    if sq:
        row.update(fd_prior=sq["prior"]["frechet_distance"], fd_ex_post=sq["ex_post"]["frechet_distance"],
                   conf_prior=sq["prior"]["confidence"], fd_test=sq["test_images"]["frechet_distance"])
    return row


def budget(out: Path, setting: Setting) -> str:
    """What the budget reached: epochs trained (of the most allowed), the best epoch, the median seconds
    an epoch took, from run.json and history.json."""
    files = RunFiles(out / "runs" / setting.name)
    info, history = files.read_info(), files.read_history()
    seconds = float(np.median([r["seconds"] for r in history])) if history else float("nan")
    return (f"{info.get('epochs_completed', len(history))}/{setting.config.epochs} (best {info.get('best_epoch')}), "
            f"{seconds:.1f} s")


COLUMNS = [  # (key, header, format)
    ("loglik", "log p(x)", "{:.2f}"), ("paired", "vs first (paired)", None),
    ("prior_gap", "prior gap", "{:.2f}"), ("components_in_use", "components in use", "{:.1f}"),
    ("parameters", "parameters enc. / dec. / prior", "{}"),
    ("train_loglik", "log p(x) train", "{:.2f}"), ("elbo", "ELBO", "{:.2f}"),
    ("rate", "rate", "{:.2f}"), ("distortion", "distortion", "{:.2f}"), ("active_units", "active units", "{:.0f}"),
    ("mutual_information", "I(x;z)", "{:.2f}"), ("marginal_kl", "KL(q(z)‖p(z))", "{:.2f}"),
    ("hole_score", "hole score", "{:.3f}"), ("fd_prior", "FD prior samples", "{:.1f}"),
    ("fd_ex_post", "FD ex-post samples", "{:.1f}"), ("conf_prior", "confidence (prior samples)", "{:.2f}"),
    ("sharp_recon", "sharpness recon.", "{:.2f}"), ("sharp_samples", "sharpness samples", "{:.2f}"),
    ("budget", "epochs (best), s/epoch", None), ("health", "health", None),
]
DERIVED = ("paired", "published", "budget", "health")  # columns not read from metrics.json
OPTIONAL = ("components_in_use",)  # shown when any run has it ("—" for the others: not a mixture)


def _cell(values: list[float], fmt: str, se: list[float] | None = None) -> str:
    """One table cell: the value; with several seeds, mean +- sd across seeds; else +- its standard error."""
    if len(values) > 1:
        return f"{fmt.format(np.mean(values))} ± {fmt.format(np.std(values, ddof=1))}"
    if se:
        return f"{fmt.format(values[0])} ± {fmt.format(se[0])}"
    return fmt.format(values[0])


def _paired(out: Path, a: Setting, b: Setting) -> np.ndarray:
    """Per-test-point differences log p_b(x) - log p_a(x) (same test points, same order)."""
    la = RunFiles(out / "runs" / a.name).read_loglik_per_point()
    lb = RunFiles(out / "runs" / b.name).read_loglik_per_point()
    return lb - la


def table(out: Path, settings: list[Setting], latent_dim: int,
          published: dict | None = None) -> tuple[list[str], list[list[str]]]:
    """The report's table for one latent size: a row per label, seeds pooled; a ``published`` column
    where the study's ``[study.published]`` has figures at this size."""
    from ..config_file import published_value

    group = [s for s in settings if s.latent_dim == latent_dim]
    labels = list(dict.fromkeys(s.label for s in group))
    rows_by_label = {lab: [s for s in group if s.label == lab] for lab in labels}
    metrics = {s.name: metric_row(out, s) for s in group}
    paper = {lab: published_value(published, lab, latent_dim) for lab in labels}
    apart = {lab: comparison(out, rows_by_label[lab][0], published)[0] for lab in labels if paper[lab] is not None}
    columns = [c for c in COLUMNS if c[0] in DERIVED or all(c[0] in metrics[s.name] for s in group)
               or c[0] in OPTIONAL and any(c[0] in metrics[s.name] for s in group)]
    if any(v is not None for v in paper.values()):
        columns.insert(1, ("published", "published", "{:.2f}"))
    header = ["", *[c[1] for c in columns]]
    body = []
    reference = rows_by_label[labels[0]]
    for lab in labels:
        runs = rows_by_label[lab]
        cells = [lab]
        for key, _, fmt in columns:
            if key == "published":
                cells.append("—" if paper[lab] is None else "not comparable" if apart[lab] else fmt.format(paper[lab]))
                continue
            if key == "budget":
                cells.append("; ".join(budget(out, r) for r in runs))
                continue
            if key == "health":
                problems = sorted({w.split(":")[0] for r in runs for w in health(out, r)})
                cells.append("⚠ " + ", ".join(problems) if problems else "ok")
                continue
            if key == "paired":
                if lab == labels[0]:
                    cells.append("—")
                    continue
                by_seed = {r.seed: r for r in reference}  # pairs of the same seed only (a run may have failed)
                pairs = [(by_seed[r.seed], r) for r in runs if r.seed in by_seed]
                if not pairs:
                    cells.append("—")
                    continue
                diffs = np.concatenate([_paired(out, r0, r1) for r0, r1 in pairs])
                cells.append(f"{diffs.mean():+.2f} ± {diffs.std(ddof=1) / math.sqrt(len(diffs)):.2f}")
                continue
            if any(key not in metrics[r.name] for r in runs):
                cells.append("—")
                continue
            values = [metrics[r.name][key] for r in runs]
            if isinstance(values[0], str):
                cells.append("; ".join(dict.fromkeys(values)))
                continue
            se = [metrics[r.name][f"{key}_se"] for r in runs] if key in ("loglik", "prior_gap") else None
            cells.append(_cell(values, fmt, se))
        body.append(cells)
    return header, body


def comparison(out: Path, setting: Setting, published: dict | None) -> tuple[list[str], str]:
    """What differs between a run's measurement and the published one's setting, and the budget note
    (:func:`pyro_vae.config_file.published_comparison`), from the run's metrics.json."""
    from ..config_file import published_comparison

    m = RunFiles(out / "runs" / setting.name).read_metrics()
    return published_comparison(published, setting.config, m["num_particles"], m["num_test_points"], setting.label)


def _published_lines(out: Path, settings: list[Setting], published: dict) -> list[str]:
    """Under the source: what keeps its figures from being compared here, or how the budgets differ."""
    from ..config_file import published_value

    notes: dict[str, list[str]] = {}
    for s in settings:
        if published_value(published, s.label, s.latent_dim) is None:
            continue
        differs, budget_note = comparison(out, s, published)
        text = ("not comparable: " + "; ".join(differs)) if differs else (budget_note or "the same setting")
        notes.setdefault(text, []).append(s.name)
    lines = []
    for text, names in notes.items():
        lines.append(f"- {', '.join(names)}: {text}.")
    return lines + [""] if lines else []


def _markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def write_report(kind: str, settings: list[Setting], out: Path, command: str = "",
                 failures: dict[str, str] | None = None, published: dict | None = None) -> Path:
    """report.md and report.html, with figures in ``out/figures``; ``failures`` (name -> error) are the
    settings whose runs failed, listed instead of reported; ``published``: a paper's figures to set beside
    the study's (:func:`pyro_vae.config_file.check_published`)."""
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
        + ("the published figure, where the source's setting (dataset, components, importance samples, test "
           "points) is this run's, else 'not comparable' (what differs is listed under the source); "
           if published else "")
        + f"the paired per-test-point difference to the first {what} (± standard error); the same bound on up to "
        "1000 random training images (far above the test figure: overfitting; both low: under-fitting); ELBO; rate "
        "KL(q(z|x)‖p(z)); distortion -E log p(x|z); active units; the mutual information and marginal KL of "
        "the aggregate posterior (ELBO surgery: rate = I + marginal KL); the prior-hole score (share of prior "
        "draws where the aggregate posterior has less density than at 99% of the data's codes); Frechet "
        "distance of decoded samples to test images in a reference classifier's feature space (prior samples, "
        "and ex-post Gaussian-mixture samples); the classifier's mean confidence on prior samples; sharpness "
        "(image-gradient energy over the data's: 1 = as sharp as the data); the epochs trained of the most "
        "allowed, the best (selected) epoch and the median seconds an epoch took.",
        "",
    ]
    if published:
        lines += [f"Published figures beside ours: {published['source']}", ""]
        lines += _published_lines(out, settings, published)
    shifted = {s.label: s.config.latent_dim - s.latent_dim for s in settings if s.config.latent_dim != s.latent_dim}
    if shifted:
        why = (" (a sphere S^d lives in R^(d+1): compared at the manifold's dimension, as Davidson et al. 2018 do)"
               if set(shifted) <= {"sphere"} else " ([study] latent_dim_offsets)")
        lines += ["At latent size d, " + ", ".join(f"the {lab} runs have latent_dim d + {n}" for lab, n in shifted.items())
                  + why + "; their active units count out of d + the offset.", ""]
    for d in dict.fromkeys(s.latent_dim for s in settings):
        header, body = table(out, settings, d, published)
        lines += [f"## Latent size {d}", "", _markdown_table(header, body), ""]
        seed = min(s.seed for s in settings if s.latent_dim == d)  # the first seed that finished at this size
        group = [s for s in settings if s.latent_dim == d and s.seed == seed]
        made = study_figures(group, out, figures, d)
        if kind == "sweep-beta":
            made["against beta"] = beta_plot([(float(s.label), metric_row(out, s)) for s in group],
                                             figures / f"beta-z{d}.png")
        for name, path in made.items():
            lines += [f"![{name}]({path.relative_to(out)})", ""]
    if kind == "sweep-beta":
        lines += _beta_findings(out, settings)
    lines += _health_section(out, settings)
    if failures:
        lines += ["## Runs that failed", ""] + [f"- **{name}**: {error}" for name, error in failures.items()] + [""]
    text = "\n".join(lines)
    atomic_write_bytes(out / "report.md", text.encode())
    html = markdown.markdown(text, extensions=["tables"])
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>pyro-vae study</title><style>"
            "body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;"
            "font-size:90%}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}"
            f"</style></head><body>{html}</body></html>")
    atomic_write_bytes(out / "report.html", page.encode())
    return out / "report.md"


def _health_section(out: Path, settings: list[Setting]) -> list[str]:
    """Every run's warnings, what the aggregate-posterior numbers depend on, and the likelihood's units."""
    lines = ["## Health and how to read the numbers", ""]
    flagged = [(s, w) for s in settings for w in health(out, s)]
    if flagged:
        lines += ["Read the paired differences of flagged runs with care: a collapsed run's log p(x) is that of "
                  "a decoder that ignores z, and an unconverged one's is a lower bound on what the setting can do.",
                  ""]
        lines += [f"- **{s.name}**: {w}" for s, w in flagged]
    else:
        lines.append(("- Every run finished and none collapsed; each reached its best validation score before its last "
                     "epoch (a run whose best epoch is its last is flagged: not converged)."))
    first = RunFiles(out / "runs" / settings[0].name).read_metrics()
    n = first["aggregate_posterior"]["num_points"]
    subsets = first.get("subsets", {})
    which = (describe(subsets["aggregate_posterior"]) if "aggregate_posterior" in subsets
             else f"the first {n} (measured before subsets were drawn at random: re-evaluate)")
    lines += ["", f"- The aggregate posterior q(z) = (1/N) sum_n q(z|x_n) uses N = {n} test points ({which}), and so "
              "do the rate it is checked against (ELBO surgery: rate = I(x;z) + KL(q(z)‖p(z)) on the same points), "
              f"I(x;z), bounded by log N = {math.log(n):.2f} nats, the marginal KL and the hole score: the last "
              "two depend on N (more points fill more of the prior)."]
    if "test" in subsets:
        lines += [f"- Test points of every other column: {describe(subsets['test'])}; the sharpness reference: "
                  f"{describe(subsets.get('sharpness_reference', subsets['test']))}; the training-image log p(x): "
                  f"{describe(subsets.get('train_log_likelihood', subsets['test']))}. Every subset is random "
                  "(torch.randperm from the recorded seed), never a file's first images: a file may be sorted "
                  "by class. The figures' test images are one random subset too (seed 0)."]
    if "prior_gap" in first:
        lines += ["- Prior gap: the test ELBO with the prior replaced by the aggregate posterior of all "
                  f"{first['prior_gap']['num_train_points']:,} training images, q(z) = (1/N) sum_n q(z|x_n), minus the "
                  "ELBO with the run's own prior (± standard error over test points). q(z) is the prior that maximises "
                  "the ELBO of the images it is made of (Hoffman & Johnson 2016); on held-out images it can do worse "
                  "than the run's prior (a negative gap): with narrow posteriors the empirical aggregate posterior "
                  "overfits, a test image's code falling between the training images' components."]
    if any("components_in_use" in metric_row(out, s) for s in settings):
        lines += ["- Components in use: the effective number exp(H(u)) of the mixture components' mean "
                  "responsibilities u over the aggregate posterior's codes (K when the codes use all K evenly, 1 "
                  "when one component explains every code); below K/10 the run is flagged as collapsed."]
    note = likelihood_note(first)
    if note:
        lines += [f"- Units: {note}."]
    return lines + [""]


def _beta_findings(out: Path, settings: list[Setting]) -> list[str]:
    """Plain statements of what the sweep measured, for the reader to check against the tables."""
    lines = ["## What the sweep measured", ""]
    for d in dict.fromkeys(s.latent_dim for s in settings):
        seed = min(s.seed for s in settings if s.latent_dim == d)
        rows = sorted(((float(s.label), metric_row(out, s)) for s in settings if s.latent_dim == d and s.seed == seed),
                      key=lambda row: row[0])
        (b0, r0), (b1, r1) = rows[0], next((r for r in rows if r[0] == 1.0), rows[-1])
        lines.append(f"- Latent size {d}: from β={b0:g} to β={b1:g} the hole score goes {r0['hole_score']:.3f} → "
                     f"{r1['hole_score']:.3f}, sharpness of prior samples {r0['sharp_samples']:.2f} → "
                     f"{r1['sharp_samples']:.2f}, of reconstructions {r0['sharp_recon']:.2f} → {r1['sharp_recon']:.2f}"
                     + (f", Frechet distance of prior samples {r0['fd_prior']:.1f} → {r1['fd_prior']:.1f}"
                        if "fd_prior" in r0 else "") + ".")
    return lines + [""]
