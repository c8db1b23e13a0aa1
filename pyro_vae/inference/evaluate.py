"""``pyro-vae evaluate``: every measurement of a trained run, into ``metrics.json`` and a table.

Held-out log-likelihoods per data point are also saved (``loglik_per_point.npy``) so that two runs
on the same test set can be compared by paired differences.
"""

from __future__ import annotations

import sys
import time

import torch

from ..errors import PyroVAEError
from ..run_dir import METRICS, PER_POINT, Run
from ..seeding import seeded
from ..subsets import describe, random_subset
from .metrics import (ExPostMixture, active_units, aggregate_posterior, components_in_use, elbo_per_datapoint,
                      has_fast_aggregate, iw_log_likelihood, mean_and_stderr, parameter_counts, prior_gap,
                      rate_and_distortion, sharpness_ratio)
from .tracking import bar as _bar, is_terminal


def ex_post_mixture(run: Run, seed: int = 0, max_points: int = 10_000) -> ExPostMixture:
    """The ex-post Gaussian mixture of a run (Ghosh et al. 2020), fitted to the codes of ``max_points``
    random training images (:func:`~pyro_vae.subsets.random_subset` of ``seed``) as training saw them
    (binarized under ``--binarize``): the one fit that ``evaluate`` and the study's figures share."""
    train = run.split("train")[0]
    return ExPostMixture(run.vae, random_subset(len(train), max_points, seed).take(train), seed=seed)


def evaluate(run: Run, num_particles: int = 1000, max_points: int | None = None, seed: int = 0,
             num_samples: int = 1000, progress: bool = True, save: bool = True,
             reuse_loglik: bool = False) -> dict:
    """All metrics of a run on its test split. ``num_particles``: K for the importance-weighted
    log-likelihood; ``max_points``: evaluate on that many test points drawn at random from ``seed`` (the
    whole split by default). Every measurement on fewer points than it is given (the aggregate posterior,
    the sharpness reference, the training images) takes a random subset of ``seed``; metrics.json's
    ``subsets`` records each one.

    ``reuse_loglik``: keep the per-point log p(x) that an earlier evaluation saved (loglik_per_point.npy)
    instead of estimating it again, where that evaluation covered the same points with the same K and
    seed (it is refused otherwise): re-evaluating a run after a change to the other measurements costs
    minutes instead of the K decoder passes per point."""
    if num_particles < 1 or num_samples < 2:
        raise PyroVAEError("--k must be >= 1 and --samples >= 2")
    check_evaluation_fits(run.vae, num_particles, num_samples)
    vae = run.vae.eval()
    data = run.dataset()
    x, labels = run.split("test")
    if max_points is not None and max_points < 2:
        raise PyroVAEError("--n-test must be >= 2")
    test = random_subset(len(x), max_points, seed)
    x = test.take(x)
    labels = None if labels is None else test.take(labels)
    kept = _reusable_loglik(run, test, num_particles, seed) if reuse_loglik else None
    started = time.perf_counter()
    stages = ["ELBO", f"log p(x), K={num_particles}", "rate/distortion", "aggregate posterior", "prior gap",
              "samples"]
    bar = _bar(stages, desc="evaluate", enabled=progress)
    lines = progress and not is_terminal()  # a log file: one line per stage instead of the bar

    def stage(i: int) -> None:
        bar.set_postfix_str(stages[i])
        if lines:
            print(f"evaluate {run.path.name}: {stages[i]} ({i + 1}/{len(stages)})", file=sys.stderr, flush=True)
    out: dict = {"num_test_points": len(x), "num_particles": num_particles, "seed": seed,
                 "subsets": {"test": test.record()}}
    with seeded(seed, x.device):
        stage(0)
        elbo = elbo_per_datapoint(vae, x, num_particles=10)
        out["elbo"] = mean_and_stderr(elbo)
        bar.update()
        stage(1)
        train_all = run.split("train")[0]
        loglik = _log_likelihoods(vae, x, train_all, kept, elbo, num_particles, seed, progress, out)
        bar.update()
        stage(2)
        rd = rate_and_distortion(vae, x)
        out["rate"] = mean_and_stderr(rd["rate"])
        out["rate_closed_form"] = rd["rate_closed_form"]
        out["distortion"] = mean_and_stderr(rd["distortion"])
        out.update(active_units(vae, x))
        bar.update()
        stage(3)
        _aggregate_measures(vae, x, rd["rate"], seed, out)
        bar.update()
        stage(4)
        gap_points = random_subset(len(x), None if has_fast_aggregate(vae, x) else SLOW_GAP_POINTS, seed)
        out["prior_gap"] = prior_gap(vae, gap_points.take(x), train_all)
        out["subsets"]["prior_gap"] = gap_points.record()
        bar.update()
        stage(5)
        out.update(_sample_metrics(run, data, x, labels, num_samples, seed, out["subsets"]))
        bar.update()
    bar.close()
    out["parameters"] = parameter_counts(vae)
    out["likelihood"] = type(vae.likelihood).__name__
    out["warnings"] = health_warnings(run.info, run.config.epochs, out)
    out["seconds"] = time.perf_counter() - started
    if save:
        run.files.write_metrics(out, loglik.cpu().numpy())
    return out


def _log_likelihoods(vae, x, train_all, kept, elbo, num_particles: int, seed: int, progress: bool, out: dict):
    """log p(x) per test point (estimated, or ``kept`` from an earlier evaluation), and the same bound on
    :data:`TRAIN_POINTS` random training images: train far above test is overfitting, both low is
    under-fitting. Fills ``out``; returns the per-point values."""
    if kept is not None:
        loglik = kept.to(elbo.device, elbo.dtype)
        out["log_likelihood_reused"] = True
    else:
        loglik = iw_log_likelihood(vae, x, num_particles=num_particles, progress=progress)
    out["log_likelihood"] = mean_and_stderr(loglik)
    train_subset = random_subset(len(train_all), TRAIN_POINTS, seed)
    train_x = train_subset.take(train_all)
    out["train_log_likelihood"] = mean_and_stderr(iw_log_likelihood(vae, train_x, num_particles=num_particles))
    out["num_train_points"] = len(train_x)
    out["subsets"]["train_log_likelihood"] = train_subset.record()
    out["gap_loglik_minus_elbo"] = mean_and_stderr(loglik - elbo)
    return loglik


def _aggregate_measures(vae, x, rates, seed: int, out: dict) -> None:
    """ELBO surgery and holes on :data:`AGGREGATE_POINTS` random test points, the rate on the same points
    beside them (like with like), and a mixture prior's components in use on their codes."""
    agg = random_subset(len(x), AGGREGATE_POINTS, seed)
    out["aggregate_posterior"] = aggregate_posterior(vae, agg.take(x))
    out["aggregate_posterior"]["rate_same_points"] = mean_and_stderr(agg.take(rates))
    out["subsets"]["aggregate_posterior"] = agg.record()
    usage = components_in_use(vae, agg.take(x))
    if usage is not None:
        out["mixture"] = usage


def _reusable_loglik(run: Run, test, num_particles: int, seed: int):
    """The per-point log p(x) an earlier evaluation of the same points, K and seed saved, or a refusal."""
    files = run.files
    try:
        old = files.read_metrics()
        values = files.read_loglik_per_point()
    except (PyroVAEError, OSError, ValueError) as e:
        raise PyroVAEError(f"--reuse-loglik: {files.path} has no earlier evaluation to reuse ({e})") from None
    old_test = old.get("subsets", {}).get("test", {"n": old.get("num_test_points"), "of": old.get("num_test_points"),
                                                   "seed": None})
    same = (old.get("num_particles") == num_particles and old_test.get("n") == len(test)
            and old_test.get("of") == test.of and (test.whole or old_test.get("seed") == test.seed)
            and len(values) == len(test) and (test.whole or old.get("seed") == seed))
    if not same:
        raise PyroVAEError(f"--reuse-loglik: the saved log p(x) of {files.path} is of other points or another K "
                           f"(K={old.get('num_particles')}, {old.get('num_test_points')} points); evaluate without it")
    return torch.as_tensor(values)


SLOW_GAP_POINTS = 500
"""Test points of the prior gap for a guide without a fast aggregate density (full covariance, IAF, ...):
each of them costs N q(z | x_n) evaluations; the diagonal Normal and power spherical guides take all."""

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
    mixture = metrics.get("mixture")
    if mixture and mixture["components_in_use"] < mixture["num_components"] / 10:
        out.append(f"mixture collapsed: {mixture['components_in_use']:.1f} of {mixture['num_components']} components "
                   "in use (the effective number of the codes' mean responsibilities): the prior is nearly a "
                   "mixture of that many components")
    return out + training_warnings(info, max_epochs)


def training_warnings(info: dict, max_epochs: int) -> list[str]:
    """What run.json alone says is wrong: a run that had not converged (its best epoch is its last, with
    no early stop), or one that did not finish. ``pyro-vae train`` prints these when it ends too."""
    out = []
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


def _sample_metrics(run: Run, data, x, labels, num_samples: int, seed: int, subsets: dict) -> dict:
    """Sharpness and sample quality; the subsets they take are recorded in ``subsets``."""
    vae = run.vae
    shape = vae.image_shape
    reference = random_subset(len(x), num_samples, seed)
    x_ref = reference.take(x)
    recon = vae.reconstruct(x_ref)
    prior_samples = vae.sample(num_samples)
    ex_post = ex_post_mixture(run, seed=seed)
    ex_post_samples = vae.decode(ex_post.sample(num_samples))
    out = {
        "sharpness": {
            "reconstructions": sharpness_ratio(recon, x_ref, shape),
            "prior_samples": sharpness_ratio(prior_samples, x_ref, shape),
            "ex_post_samples": sharpness_ratio(ex_post_samples, x_ref, shape),
        },
    }
    subsets["sharpness_reference"] = reference.record()
    if labels is not None and data.train_labels is not None:
        from .sample_quality import reference_classifier, sample_quality

        clf, accuracy = reference_classifier(data)
        half = random_subset(len(x), len(x) // 2, seed + 1)  # the test points split at random into halves
        rest = torch.ones(len(x), dtype=torch.bool)
        rest[half.indices] = False
        first, second = half.take(x), x[rest.to(x.device)]
        out["sample_quality"] = {
            "classifier_test_accuracy": accuracy,
            "prior": sample_quality(clf, prior_samples, x),
            "ex_post": sample_quality(clf, ex_post_samples, x),
            "test_images": sample_quality(clf, first, second),
            "reconstructions": sample_quality(clf, recon, x),
        }
        subsets["frechet_test_halves"] = half.record()  # one half; the other is the rest
    return out


def format_table(metrics: dict) -> str:
    """A readable summary of metrics.json."""

    def pm(v) -> str:
        mean, se = v
        return f"{mean:10.3f} +- {se:.3f}"

    agg = metrics["aggregate_posterior"]
    rows = [
        ("test points", f"{metrics['num_test_points']:10d}"
         + (f"  ({describe(metrics['subsets']['test'])})" if "subsets" in metrics else "")),
        ("ELBO (nats)", pm(metrics["elbo"])),
        (f"log p(x), K={metrics['num_particles']}", pm(metrics["log_likelihood"])),
        *([(f"  on {metrics['num_train_points']} training images", pm(metrics["train_log_likelihood"]))]
          if "train_log_likelihood" in metrics else []),
        ("log p(x) - ELBO", pm(metrics["gap_loglik_minus_elbo"])),
        ("rate KL(q(z|x)||p(z))" + ("" if metrics["rate_closed_form"] else " [MC]"), pm(metrics["rate"])),
        ("distortion -E log p(x|z)", pm(metrics["distortion"])),
        ("active units", f"{metrics['active_units']:10d}"),
        (f"aggregate posterior over N = {agg['num_points']} test points"
         + (f" ({describe(metrics['subsets']['aggregate_posterior'])})" if "subsets" in metrics else ""), ""),
        ("  rate on these N points", pm(agg["rate_same_points"]) if "rate_same_points" in agg else "         -"),
        ("  I + marginal KL (= that rate)", pm(agg["rate_from_surgery"])),
        ("  mutual information I(x;z)", pm(agg["mutual_information"]) + f"  (<= log N = {agg['mutual_information_bound']:.2f})"),
        ("  marginal KL(q(z)||p(z))", pm(agg["marginal_kl"]) + "  (depends on N)"),
        ("  prior-hole score", pm(agg["hole_score"]) + "  (depends on N)"),
        ("sharpness: reconstructions", f"{metrics['sharpness']['reconstructions']:10.3f}"),
        ("sharpness: prior samples", f"{metrics['sharpness']['prior_samples']:10.3f}"),
        ("sharpness: ex-post samples", f"{metrics['sharpness']['ex_post_samples']:10.3f}"),
    ]
    mix = metrics.get("mixture")
    if mix:
        rows.append((f"mixture: components in use (of {mix['num_components']})",
                     f"{mix['components_in_use']:10.1f}  (weights' effective number {mix['weights_effective_number']:.1f})"))
    if "prior_gap" in metrics:
        rows.append(("prior gap: ELBO(aggregate q(z)) - ELBO", pm(metrics["prior_gap"]["gap"])
                     + f"  (q(z) of {metrics['prior_gap']['num_train_points']} training images)"))
    if "parameters" in metrics:
        p = metrics["parameters"]
        rows.append(("parameters: encoder / decoder / prior",
                     f"{p['encoder']:10d} / {p['decoder']} / {p['prior']}  (total {p['total']})"))
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
