"""The ``pyro-vae`` command line. Every Config field is a ``train`` flag (``latent_dim`` -> ``--latent-dim``)."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
from pathlib import Path

from .config import Config, add_config_flags
from .errors import PyroVAEError, RunInterrupted, TrainingDiverged, one_line


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (the usage stays with --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


CONFIG_HELP = ("start from this config file (TOML, JSON such as a run's config.json, or YAML) or shipped recipe "
               "(recipes/vampprior-static-mnist.toml); flags given as well override it")
STUDY_DEFAULTS = {"priors": "normal,laplace,student-t,mog,vamp,flow", "betas": "0,0.1,0.5,1,2,4", "latent_dims": "2",
                  "seeds": 1, "k": 1000}
MAX_SEEDS = 1000  # seeds per setting a study takes: each is a run trained to the end
TRUST_HELP = ("import and run the prior this run's config.json names as module:attribute (only for run "
              "directories you trust: importing a module runs its code)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyro-vae",
        description="Train and inspect VAEs written as Pyro models, to measure what the N(0, I) prior does.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a VAE and write a run directory",
                           description="Train a VAE by SVI and write a run directory with its figures.")
    train.add_argument("--out", type=Path, help="run directory to create (default: runs/<dataset>-<prior>-z<d>-<time>)")
    train.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    train.add_argument("--resume", type=Path, metavar="RUN",
                       help="continue the interrupted run in RUN from its last checkpoint (--epochs may extend it)")
    train.add_argument("--trust-prior", action="store_true", help=TRUST_HELP + "; with --resume or --config")
    train.add_argument("--devices", type=int, default=1, help="data-parallel processes (GPUs with --accelerator cuda) "
                       "per node, through Lightning Fabric (default: 1, no Fabric)")
    train.add_argument("--num-nodes", type=int, default=1, help="nodes for --devices (torchrun or SLURM; default: 1)")
    train.add_argument("--accelerator", choices=("cpu", "cuda"), help="for --devices (default: --device)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(train)

    _add_analyze_parser(sub)

    sample = sub.add_parser("sample", help="decode draws z ~ p(z) of a trained run into an image grid")
    sample.add_argument("run", type=Path, metavar="RUN", help="a run directory")
    sample.add_argument("--n", type=int, default=64, help="how many samples (default: 64)")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    sample.add_argument("--out", type=Path, help="PNG to write (default: RUN/figures/samples-seed<seed>.png)")
    sample.add_argument("--trust-prior", action="store_true", help=TRUST_HELP)

    recon = sub.add_parser("reconstruct", help="reconstruct held-out images of a trained run")
    recon.add_argument("run", type=Path, metavar="RUN", help="a run directory")
    recon.add_argument("--n", type=int, default=32, help="how many images (default: 32)")
    recon.add_argument("--split", choices=("train", "valid", "test"), default="test", help="which split (default: test)")
    recon.add_argument("--seed", type=int, default=0,
                       help="the images are a random subset of the split drawn from this seed (default: 0)")
    recon.add_argument("--indices", type=str,
                       help="comma-separated indices into the split to reconstruct instead (e.g. 0,5,17)")
    recon.add_argument("--out", type=Path, help="PNG to write (default: RUN/figures/reconstructions-<split>.png)")
    recon.add_argument("--trust-prior", action="store_true", help=TRUST_HELP)
    evaluate = sub.add_parser("evaluate", help="measure a trained run: log-likelihood, rate/distortion, holes, samples",
                              description="Every metric of a run on its test split, into RUN/metrics.json.")
    evaluate.add_argument("run", type=Path, metavar="RUN", help="a run directory")
    evaluate.add_argument("--k", type=int, default=1000,
                          help="importance samples per data point for log p(x) (default: 1000; 5000 for tighter)")
    evaluate.add_argument("--n-test", type=int, help="evaluate on this many test points, a random subset drawn "
                          "from --seed (default: all)")
    evaluate.add_argument("--reuse-loglik", action="store_true",
                          help="keep the per-point log p(x) of an earlier evaluation of the same points, K and seed "
                          "(loglik_per_point.npy) and measure everything else again")
    evaluate.add_argument("--samples", type=int, default=1000, help="generated images for sample metrics (default: 1000)")
    evaluate.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    evaluate.add_argument("--trust-prior", action="store_true", help=TRUST_HELP)
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_study_parsers(sub)
    return parser


def _add_study_parsers(sub) -> None:
    """``compare`` and ``sweep-beta``: the study commands, which share every flag but the one they vary."""
    for name, what in (("compare", "priors"), ("sweep-beta", "betas")):
        study = sub.add_parser(
            name, help=("train and evaluate one run per prior, write report.md" if name == "compare" else
                        "train and evaluate one run per KL weight beta (0 = autoencoder), write report.md"),
            description=("The same VAE under several priors, evaluated and reported." if name == "compare" else
                         "The same VAE under several KL weights: what the KL pull does to sampling and blur."))
        if name == "compare":
            study.add_argument("--priors", help=f"comma-separated priors (default: {STUDY_DEFAULTS['priors']})")
            study.add_argument("--latent-dim-offsets", metavar="PRIOR=N,...",
                               help="a prior's runs at latent size d get latent_dim d + N, e.g. sphere=1: S^d lives "
                                    "in R^(d+1), as Davidson et al. compare them (default: none)")
            study.add_argument("--parameter-matched", metavar="PRIOR",
                               help="add the parameter-count control: beside each PRIOR run, an N(0, I) run whose "
                                    "decoder is widened to that run's parameter count (normal-wide; default: none)")
        else:
            study.add_argument("--betas", help=f"comma-separated betas (default: {STUDY_DEFAULTS['betas']})")
        study.add_argument("--latent-dims", help="comma-separated latent sizes (default: 2)")
        study.add_argument("--seeds", type=int, help="seeds per setting (default: 1)")
        study.add_argument("--k", type=int, help="importance samples for log p(x) (default: 1000)")
        study.add_argument("--config", metavar="FILE", help=CONFIG_HELP + "; its [study] table sets the options above")
        study.add_argument("--trust-prior", action="store_true",
                           help="import priors the --config file names as module:attribute (importing runs code)")
        study.add_argument("--out", type=Path, required=True, help="study directory (runs/, report.md, figures/)")
        study.add_argument("--executor", choices=("local", "ray"), default="local",
                           help="run the settings here one after another, or as Ray tasks (default: local)")
        study.add_argument("--ray-address", metavar="ADDR", help="a Ray cluster's address (default: start a local one)")
        study.add_argument("--cpus-per-run", type=int, help="CPUs (torch threads) per run (default: all; Ray: 1)")
        study.add_argument("--gpus-per-run", type=float, default=0.0, help="GPUs per Ray task (default: 0)")
        study.add_argument("--restart", action="store_true",
                           help="train again the runs in --out whose config differs from this command's settings")
        study.add_argument("--quiet", action="store_true", help="no progress bar")
        add_config_flags(study, hidden=("prior", "latent_dim") if name == "compare" else ("beta", "latent_dim"))


def cmd_study(args: argparse.Namespace) -> int:
    from .outputs import check_output_dir
    from .study import beta_settings, compare_settings, run_study

    refused = {"compare": {"prior": "--priors", "latent_dim": "--latent-dims"},
               "sweep-beta": {"beta": "--betas", "latent_dim": "--latent-dims"}}[args.command]
    for name, instead in refused.items():
        if name in vars(args):
            raise PyroVAEError(f"{args.command} takes {instead}, not --{name.replace('_', '-')} (each setting sets it)")
    base, options = _config_from_args(args)
    for key, default in STUDY_DEFAULTS.items():  # a flag, else the config file's [study], else the default
        flag = getattr(args, key, None)
        options[key] = flag if flag is not None else options.get(key, default)
    dims = _list(options["latent_dims"], int, "--latent-dims")
    if options["seeds"] < 1 or not dims:
        raise PyroVAEError("--seeds must be >= 1 and --latent-dims must name at least one size")
    if options["seeds"] > MAX_SEEDS:
        raise PyroVAEError(f"--seeds {options['seeds']} is more than a study can train (at most {MAX_SEEDS} per setting)")
    _check_count("--k", options["k"])
    check_output_dir(args.out)
    if args.command == "compare":
        priors = _list(options["priors"], str, "--priors")
        if args.config and args.priors is None and not args.trust_prior:
            _refuse_module_priors(args.config, priors)
        offsets = _offsets(args, options)
        settings = compare_settings(base, priors, dims, options["seeds"], offsets)  # (unknown names refused)
        unused = [p for p in offsets if p not in priors]
        if unused:
            print(f"pyro-vae: warning: --latent-dim-offsets names {', '.join(unused)}, which --priors "
                  f"{','.join(priors)} leaves out: no effect", file=sys.stderr)
        matched = args.parameter_matched if args.parameter_matched is not None else options.get("parameter_matched")
        if matched:
            from .study.settings import parameter_matched_settings

            settings += parameter_matched_settings(settings, matched)
    else:
        if options.get("parameter_matched"):
            raise PyroVAEError(f"{args.config}: [study] parameter_matched is for compare (sweep-beta trains one prior)")
        if options.get("latent_dim_offsets"):
            raise PyroVAEError(f"{args.config}: [study] latent_dim_offsets is for compare (sweep-beta trains one "
                               "prior, at the sizes --latent-dims gives)")
        priors = [base.prior]
        settings = beta_settings(base, _list(options["betas"], float, "--betas"), dims, options["seeds"])
    _warn_without_effect(args, priors)
    command = "pyro-vae " + " ".join(sys.argv[1:]) if sys.argv and "pyro" in sys.argv[0] else ""
    report = run_study(args.command, settings, args.out, k=options["k"], progress=not args.quiet, command=command,
                       restart=args.restart, executor=args.executor, ray_address=args.ray_address,
                       cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run,
                       published=options.get("published"))
    print(f"report: {report} (and {report.with_suffix('.html')})")
    return 0


def _offsets(args: argparse.Namespace, options: dict) -> dict[str, int]:
    """--latent-dim-offsets PRIOR=N,... (else the config file's [study] latent_dim_offsets)."""
    from .study.settings import parse_offsets

    if args.latent_dim_offsets is None:
        return dict(options.get("latent_dim_offsets", {}))
    return parse_offsets(_list(args.latent_dim_offsets, str, "--latent-dim-offsets"))


def _list(value, kind, flag: str) -> list:
    """A comma-separated flag, or a list from a config file, as a list of ``kind``."""
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
    try:
        return [kind(v) for v in items]
    except ValueError:
        raise PyroVAEError(f"{flag} takes comma-separated {kind.__name__} values, got {value!r}") from None


def _refuse_module_priors(config: str, priors: list[str]) -> None:
    named = [p for p in priors if ":" in p]
    if named:
        raise PyroVAEError(f"{config} names the prior {named[0]!r}, which would import the module "
                           f"{named[0].partition(':')[0]!r} and run its code: pass --trust-prior if you trust "
                           "it, or name the priors with --priors")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .inference.evaluate import METRICS, evaluate, format_table
    from .outputs import check_output_dir
    from .run_dir import load_run

    _check_seed(args.seed)
    run = _open_run(args)
    check_output_dir(run.path, "the run directory")
    metrics = evaluate(run, num_particles=args.k, max_points=args.n_test, seed=args.seed,
                       num_samples=args.samples, progress=not args.quiet, reuse_loglik=args.reuse_loglik)
    print(format_table(metrics))
    print(f"written: {run.path / METRICS}")
    return 0


def _config_from_args(args: argparse.Namespace) -> tuple[Config, dict]:
    """The Config of a command: defaults, then the --config file's fields, then the flags given; and the
    file's [study] options."""
    from .config_file import read_config_file

    base, study = Config().to_dict(), {}
    if getattr(args, "config", None) is not None:
        config_file = read_config_file(args.config)
        base.update(config_file.fields)
        study = dict(config_file.study)
        if "prior" not in vars(args) and not args.trust_prior:
            _refuse_module_priors(args.config, [p for p in [base["prior"]] if p != "<object>"])
    names = {f.name for f in dataclasses.fields(Config)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if "prior_args" in given:
        given["prior_args"] = {**base.get("prior_args", {}), **dict(given["prior_args"])}
    base.update(given)
    return Config.from_dict(base), study


def _warn_without_effect(args: argparse.Namespace, priors: list[str]) -> None:
    """One warning line per --prior-* flag that none of the priors uses."""
    from .models.priors import options_without_effect

    for flag in options_without_effect(priors, set(vars(args))):
        print(f"pyro-vae: warning: {flag} has no effect with --prior{'s' if len(priors) > 1 else ''} "
              f"{','.join(priors)}", file=sys.stderr)


def _check_count(flag: str, value: int, least: int = 1) -> None:
    if value < least:
        raise PyroVAEError(f"{flag} must be >= {least}, got {value}")


def _check_seed(seed: int) -> None:
    from .config import SEED_LIMIT

    if not 0 <= seed < SEED_LIMIT:
        raise PyroVAEError(f"--seed must lie in [0, 2^32), got {seed}")


def cmd_train(args: argparse.Namespace) -> int:
    from .inference.train import resume, train

    from .inference.distributed import check_devices

    check_devices(args.devices, args.num_nodes, args.accelerator or getattr(args, "device", "cpu"))
    if args.resume is not None:
        extra = set(vars(args)) & ({f.name for f in dataclasses.fields(Config)} - {"epochs", "jit"})
        if extra or args.config or args.out:
            raise PyroVAEError("--resume takes the run's own config.json; only --epochs and --jit/--no-jit may "
                               "be given with it")
        if args.devices > 1 or args.num_nodes > 1:
            return _train_distributed(args, None)
        run = resume(args.resume, epochs=getattr(args, "epochs", None), jit=getattr(args, "jit", None),
                     trust=args.trust_prior, progress=not args.quiet)
    elif args.devices > 1 or args.num_nodes > 1:
        return _train_distributed(args, _config_from_args(args)[0])
    else:
        config = _config_from_args(args)[0]
        _warn_without_effect(args, [config.prior])
        run = train(config, args.out, progress=not args.quiet)
    info = run.info
    print(f"run directory: {run.path}")
    print(f"  epochs: {info['epochs_completed']}  best epoch: {info['best_epoch']}  "
          f"validation ELBO: {info['best_valid_elbo']:.3f}  test ELBO: {info['test_elbo']:.3f} nats")
    why = "" if info["compiled"] else f" (not compiled: {info['not_compiled_because']})"
    print(f"  objective: {info['elbo']}{why}")
    print(f"  figures: {run.figures}/")
    from .inference.evaluate import training_warnings

    for warning in training_warnings(info, run.config.epochs):
        more = (f" (pyro-vae train --resume {run.path} --epochs {2 * info['epochs_completed']})"
                if warning.startswith("not converged") else "")
        print(f"  warning: {warning}{more}")
    return 0


def _train_distributed(args: argparse.Namespace, config: Config | None) -> int:
    """pyro-vae train --devices N: data-parallel through Lightning Fabric (rank 0 prints the result)."""
    import dataclasses as dc

    from .inference.distributed import train_distributed
    from .run_dir import RunFiles

    out = args.resume if config is None else args.out
    if config is None:  # --resume: the run's own config, checked as untrusted input
        config = RunFiles(args.resume).read_config()
        if getattr(args, "epochs", None) is not None:
            config = dc.replace(config, epochs=args.epochs)
    elif out is None:
        from .inference.train import default_run_path

        out = default_run_path(config)
    run = train_distributed(config, out, devices=args.devices, num_nodes=args.num_nodes,
                            accelerator=args.accelerator or config.device, resume=args.resume is not None,
                            trust=args.trust_prior, progress=not args.quiet)
    if run is not None:
        print(f"run directory: {run.path}\n  epochs: {run.info['epochs_completed']}  test ELBO: "
              f"{run.info['test_elbo']:.3f} nats  ({args.devices * args.num_nodes} processes, {run.info['elbo']})")
    return 0


def _open_run(args: argparse.Namespace):
    """The run directory a command reads (``args.run``, its prior imported only with --trust-prior), with a
    warning line where it is not a finished run or its history.json does not agree with run.json."""
    from .run_dir import load_run

    run = load_run(args.run, trust=args.trust_prior)
    warning = run.status_warning()
    if warning:
        print(f"pyro-vae: warning: {warning}", file=sys.stderr)
    return run


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from .outputs import check_output_file
    from .plots import SAMPLES_TITLE, plot_images
    from .resources import check_fits
    from .run_dir import load_run

    _check_count("--n", args.n)
    _check_seed(args.seed)
    run = _open_run(args)
    check_fits(f"--n {args.n} samples", 3.0 * args.n * (run.vae.data_dim + run.vae.latent_dim))
    out = check_output_file(args.out or run.figures / f"samples-seed{args.seed}.png", suffix=".png")
    torch.manual_seed(args.seed)
    plot_images(run.vae.sample(args.n), run.vae.image_shape, out, SAMPLES_TITLE)
    print(out)
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from .outputs import check_output_file
    from .plots import plot_reconstructions
    from .run_dir import load_run
    from .subsets import describe, parse_indices, random_subset

    _check_count("--n", args.n)
    _check_seed(args.seed)
    run = _open_run(args)
    out = check_output_file(args.out or run.figures / f"reconstructions-{args.split}.png", suffix=".png")
    x, _ = run.split(args.split)  # binarized as in training, where it was
    if args.indices is not None:
        chosen = parse_indices(args.indices, len(x))
        what = f"images {args.indices} of the {args.split} split"
    else:
        subset = random_subset(len(x), args.n, args.seed)
        chosen, what = subset.indices, f"{args.split} images: {describe(subset.record())}"
    plot_reconstructions(run.vae, x[chosen.to(x.device)], out, n=len(chosen), what=what)
    print(out)
    return 0


# --------------------------------------------------------------------------- pyro-vae analyze


def _add_analyze_parser(sub) -> None:
    analyze = sub.add_parser(
        "analyze", help="posterior analysis with ArviZ: guide vs NUTS draws, diagnostics, amortization gap",
        description="Draw z for a few data points from the amortized guide, from a guide optimised for each "
                    "point alone, and from NUTS on the exact posterior p(z|x); write an ArviZ InferenceData "
                    "(idata.nc), R-hat/ESS and guide-vs-NUTS summaries, the gaps log p(x) - ELBO "
                    "(approximation + amortization), and figures.")
    analyze.add_argument("run", type=Path, metavar="RUN", help="a run directory")
    which = analyze.add_mutually_exclusive_group()
    which.add_argument("--obs", type=int, help="how many data points, drawn at random with --seed (default: 4)")
    which.add_argument("--indices", type=int, nargs="+", metavar="I", help="which data points (positions in --split)")
    analyze.add_argument("--split", choices=("train", "valid", "test"), default="test", help="(default: test)")
    analyze.add_argument("--chains", type=int, default=4, help="NUTS chains, run one after another (default: 4)")
    analyze.add_argument("--draws", type=int, default=500, help="NUTS draws kept per chain (default: 500)")
    analyze.add_argument("--warmup", type=int, default=500, help="NUTS warm-up steps per chain (default: 500)")
    analyze.add_argument("--dense-mass", action="store_true",
                         help="adapt a full NUTS mass matrix (good for few, correlated latents)")
    analyze.add_argument("--particles", type=int, default=5000,
                         help="importance samples per data point for the ELBOs and log p(x) (default: 5000)")
    analyze.add_argument("--no-optimise", dest="optimise", action="store_false",
                         help="skip the per-point guide (and the split of the gap into its two parts)")
    analyze.add_argument("--no-figures", dest="figures", action="store_false", help="write no figures")
    analyze.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    analyze.add_argument("--out", type=Path, help="output directory (default: RUN/analysis)")
    analyze.add_argument("--trust-prior", action="store_true", help=TRUST_HELP)
    analyze.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_analyze(args: argparse.Namespace) -> int:
    from .inference.analysis import analyze_run
    from .inference.settings import AnalysisSettings

    settings = AnalysisSettings(num_chains=args.chains, num_draws=args.draws, warmup=args.warmup, seed=args.seed,
                                dense_mass=args.dense_mass, optimise=args.optimise, num_particles=args.particles,
                                figures=args.figures, progress=not args.quiet).validate()
    analysis, paths = analyze_run(args.run, args.out, split=args.split, obs=args.obs, indices=args.indices,
                                  settings=settings, trust=args.trust_prior)
    print(analysis.report())
    out = paths["idata"].parent
    files = [p.name for p in paths.values() if p.parent == out] + (["figures/"] if args.figures else [])
    print(f"\nwritten to {out}/: {', '.join(files)}")
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "reconstruct": cmd_reconstruct, "evaluate": cmd_evaluate,
            "analyze": cmd_analyze, "compare": cmd_study, "sweep-beta": cmd_study}


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, a cluster's scheduler) ends a run as Ctrl-C does: recorded, resumable


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return COMMANDS[args.command](args)
    except PyroVAEError as e:
        print(f"pyro-vae: error: {one_line(e, limit=2000)}", file=sys.stderr)  # the one-line rule, whatever the source
        return 2
    except TrainingDiverged as e:
        print(f"pyro-vae: training diverged: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"pyro-vae: {e}" if isinstance(e, RunInterrupted) else "pyro-vae: interrupted; nothing was written",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
