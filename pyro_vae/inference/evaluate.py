"""``pyro-vae evaluate``: every measurement of a trained run, into ``metrics.json`` and a table.

Held-out log-likelihoods per data point are also saved (``loglik_per_point.npy``) so that two runs
on the same test set can be compared by paired differences.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..errors import PyroVAEError
from ..run_dir import METRICS, PER_POINT, Run
from ..seeding import seeded
from .metrics import (ExPostMixture, active_units, aggregate_posterior, elbo_per_datapoint, iw_log_likelihood,
                      mean_and_stderr, rate_and_distortion, sharpness_ratio)


def ex_post_mixture(run: Run, seed: int = 0, max_points: int = 10_000) -> ExPostMixture:
    """The ex-post Gaussian mixture of a run (Ghosh et al. 2020), fitted to the codes of its first
    ``max_points`` training images as training saw them (binarized under ``--binarize``): the one fit
    that ``evaluate`` and the study's figures share."""
    return ExPostMixture(run.vae, run.split("train")[0][:max_points], seed=seed)


def evaluate(run: Run, num_particles: int = 1000, max_points: int | None = None, seed: int = 0,
             num_samples: int = 1000, progress: bool = True, save: bool = True) -> dict:
    """All metrics of a run on its test split. ``num_particles``: K for the importance-weighted
    log-likelihood; ``max_points``: evaluate on the first N test points only (in a fixed random order)."""
    if num_particles < 1 or num_samples < 2:
        raise PyroVAEError("--k must be >= 1 and --samples >= 2")
    check_evaluation_fits(run.vae, num_particles, num_samples)
    vae = run.vae.eval()
    data = run.dataset()
    x, labels = run.split("test")
    if max_points is not None:
        if max_points < 2:
            raise PyroVAEError("--n-test must be >= 2")
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:max_points]
        x = x[order.to(x.device)]
    started = time.perf_counter()
    stages = ["ELBO", f"log p(x), K={num_particles}", "rate/distortion", "aggregate posterior", "samples"]
    bar = tqdm(stages, desc="evaluate", disable=not progress)
    out: dict = {"num_test_points": len(x), "num_particles": num_particles, "seed": seed}
    with seeded(seed, x.device):
        bar.set_postfix_str(stages[0])
        elbo = elbo_per_datapoint(vae, x, num_particles=10)
        out["elbo"] = mean_and_stderr(elbo)
        bar.update()
        bar.set_postfix_str(stages[1])
        loglik = iw_log_likelihood(vae, x, num_particles=num_particles, progress=progress)
        out["log_likelihood"] = mean_and_stderr(loglik)
        # the same bound on (at most 1000) training images: train far above test is overfitting, both low
        # is under-fitting
        train_x = run.split("train")[0][:TRAIN_POINTS]
        out["train_log_likelihood"] = mean_and_stderr(iw_log_likelihood(vae, train_x, num_particles=num_particles))
        out["num_train_points"] = len(train_x)
        out["gap_loglik_minus_elbo"] = mean_and_stderr(loglik - elbo)
        bar.update()
        bar.set_postfix_str(stages[2])
        rd = rate_and_distortion(vae, x)
        out["rate"] = mean_and_stderr(rd["rate"])
        out["rate_closed_form"] = rd["rate_closed_form"]
        out["distortion"] = mean_and_stderr(rd["distortion"])
        out.update(active_units(vae, x))
        bar.update()
        bar.set_postfix_str(stages[3])
        n_agg = min(len(x), AGGREGATE_POINTS)
        out["aggregate_posterior"] = aggregate_posterior(vae, x[:n_agg])
        # ELBO surgery compares like with like: the rate on the same N points as I(x;z) + marginal KL
        out["aggregate_posterior"]["rate_same_points"] = mean_and_stderr(rd["rate"][:n_agg])
        bar.update()
        bar.set_postfix_str(stages[4])
        out.update(_sample_metrics(run, data, x, labels if max_points is None else None, num_samples, seed))
        bar.update()
    bar.close()
    out["likelihood"] = type(vae.likelihood).__name__
    out["warnings"] = health_warnings(run.info, run.config.epochs, out)
    out["seconds"] = time.perf_counter() - started
    if save:
        run.files.write_metrics(out, loglik.cpu().numpy())
    return out


TRAIN_POINTS = 1000
"""Training images whose log p(x) evaluate measures beside the test images'."""

AGGREGATE_POINTS = 2000
"""Test points of the aggregate posterior q(z) = (1/N) sum_n q(z | x_n) (its I(x;z) is at most log N)."""


def health_warnings(info: dict, max_epochs: int, metrics: dict) -> list[str]:
    """What a table of numbers would hide: posterior collapse, a run that had not converged, one that
    diverged or did not finish. From run.json (``info``), the config's epochs and metrics.json."""
    out = []
    rate = metrics["rate"][0]
    if metrics["active_units"] == 0 or rate < 0.1:
        out.append(f"posterior collapse: {metrics['active_units']} active units, rate {rate:.3f} nats: q(z|x) is "
                   "(nearly) the prior for every x, so the decoder ignores z")
    best, done = info.get("best_epoch"), info.get("epochs_completed")
    if info.get("status") == "finished" and best is not None and best == done and not info.get("stopped_early"):
        out.append(f"not converged: the best epoch is the last one ({done} of at most {max_epochs}); "
                   "the validation ELBO was still rising: train longer")
    if info.get("status") != "finished":
        out.append(f"the run is marked {info.get('status')!r}, not finished: these are its best weights so far")
    return out


def likelihood_note(metrics: dict) -> str | None:
    """Why log p(x) is positive and the distortion negative under the continuous Bernoulli."""
    if metrics.get("likelihood") not in ("ContinuousBernoulli", "Gaussian"):
        return None
    return ("p(x|z) is a density on [0, 1]^D (continuous Bernoulli) or R^D (Gaussian), not a probability: it can "
            "exceed 1, so log p(x) can be positive and the distortion -E log p(x|z) negative; compare runs by "
            "differences, and not with the nats of binary-data papers")


def check_evaluation_fits(vae, num_particles: int, num_samples: int) -> None:
    """Refuse a K or a number of samples that cannot fit in memory: the importance-weighted bound holds
    K x (at least one data point) x (pixels + hidden units) numbers at once; the samples, N x pixels."""
    from ..resources import check_fits

    width = 2 * vae.data_dim + 4 * vae.latent_dim + 2 * sum(p.shape[0] for p in vae.decoder.parameters()
                                                            if p.dim() == 1)
    check_fits(f"--k {num_particles}", 2.0 * num_particles * width, str(vae.device))
    check_fits(f"--samples {num_samples}", 4.0 * num_samples * (vae.data_dim + vae.latent_dim), str(vae.device))


def _sample_metrics(run: Run, data, x, labels, num_samples: int, seed: int) -> dict:
    vae = run.vae
    shape = vae.image_shape
    n = min(num_samples, len(x))
    recon = vae.reconstruct(x[:n])
    prior_samples = vae.sample(num_samples)
    ex_post = ex_post_mixture(run, seed=seed)
    ex_post_samples = vae.decode(ex_post.sample(num_samples))
    out = {
        "sharpness": {
            "reconstructions": sharpness_ratio(recon, x[:n], shape),
            "prior_samples": sharpness_ratio(prior_samples, x[:n], shape),
            "ex_post_samples": sharpness_ratio(ex_post_samples, x[:n], shape),
        }
    }
    if labels is not None and data.train_labels is not None:
        from .sample_quality import reference_classifier, sample_quality

        clf, accuracy = reference_classifier(data)
        out["sample_quality"] = {
            "classifier_test_accuracy": accuracy,
            "prior": sample_quality(clf, prior_samples, x),
            "ex_post": sample_quality(clf, ex_post_samples, x),
            "test_images": sample_quality(clf, x[: len(x) // 2], x[len(x) // 2 :]),
            "reconstructions": sample_quality(clf, recon, x),
        }
    return out


def format_table(metrics: dict) -> str:
    """A readable summary of metrics.json."""

    def pm(v) -> str:
        mean, se = v
        return f"{mean:10.3f} +- {se:.3f}"

    agg = metrics["aggregate_posterior"]
    rows = [
        ("test points", f"{metrics['num_test_points']:10d}"),
        ("ELBO (nats)", pm(metrics["elbo"])),
        (f"log p(x), K={metrics['num_particles']}", pm(metrics["log_likelihood"])),
        *([(f"  on {metrics['num_train_points']} training images", pm(metrics["train_log_likelihood"]))]
          if "train_log_likelihood" in metrics else []),
        ("log p(x) - ELBO", pm(metrics["gap_loglik_minus_elbo"])),
        ("rate KL(q(z|x)||p(z))" + ("" if metrics["rate_closed_form"] else " [MC]"), pm(metrics["rate"])),
        ("distortion -E log p(x|z)", pm(metrics["distortion"])),
        ("active units", f"{metrics['active_units']:10d}"),
        (f"aggregate posterior over N = {agg['num_points']} test points", ""),
        ("  rate on these N points", pm(agg["rate_same_points"]) if "rate_same_points" in agg else "         -"),
        ("  I + marginal KL (= that rate)", pm(agg["rate_from_surgery"])),
        ("  mutual information I(x;z)", pm(agg["mutual_information"]) + f"  (<= log N = {agg['mutual_information_bound']:.2f})"),
        ("  marginal KL(q(z)||p(z))", pm(agg["marginal_kl"]) + "  (depends on N)"),
        ("  prior-hole score", pm(agg["hole_score"]) + "  (depends on N)"),
        ("sharpness: reconstructions", f"{metrics['sharpness']['reconstructions']:10.3f}"),
        ("sharpness: prior samples", f"{metrics['sharpness']['prior_samples']:10.3f}"),
        ("sharpness: ex-post samples", f"{metrics['sharpness']['ex_post_samples']:10.3f}"),
    ]
    sq = metrics.get("sample_quality")
    if sq:
        rows.append(("classifier test accuracy", f"{sq['classifier_test_accuracy']:10.3f}"))
        for key in ("prior", "ex_post", "reconstructions", "test_images"):
            s = sq[key]
            rows.append((f"{key.replace('_', '-')}: Frechet / conf / H(class)",
                         f"{s['frechet_distance']:10.3f}   {s['confidence']:.3f}   {s['class_entropy']:.2f}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    note = likelihood_note(metrics)
    lines += [f"note: {note}"] if note else []
    return "\n".join(lines + [f"warning: {w}" for w in metrics.get("warnings", [])])


__all__ = ["evaluate", "format_table", "ex_post_mixture", "health_warnings", "likelihood_note", "METRICS",
           "PER_POINT", "AGGREGATE_POINTS"]
