"""The SVI loop: mini-batches of the training set, a validation ELBO each epoch, early stopping,
the best weights and a resumable checkpoint written atomically after every epoch, and a progress bar.

One run goes through: set-up (:func:`_setup`, shared by :func:`train` and :func:`resume`), the
compiled ELBO or the Python one if tracing fails (:func:`_compile_or_fall_back`), the state restored
from a checkpoint (:func:`_restore`), one epoch at a time (:func:`_train_epoch`), the checkpoint
selected and saved (:func:`_select_and_save`), and the test ELBO and figures (:func:`_finish`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch

from ..config import Config
from ..data import Dataset, load_dataset
from ..errors import PyroVAEError, RunInterrupted, TrainingDiverged, first_line
from ..models.base import Prior
from ..models.priors import UntrustedPrior, prior_reference
from ..models.user_priors import module_folder
from ..models.sizes import check_step_fits
from ..models.vae import VAE, build_vae
from ..outputs import check_output_dir
from ..run_dir import OBJECT_PRIOR, Checkpoint, Run, RunFiles, load_run, prior_for
from ..seeding import seeded
from .metrics import elbo_per_datapoint, rate_and_distortion
from .objectives import KLWeight, check_objective
from .step import TrainingStep
from .tracking import Progress, Tracker

EVAL_SEED_OFFSET = 10_007  # validation/test Monte Carlo draws use their own stream, not the training one


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise PyroVAEError("--device cuda was asked for, but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise PyroVAEError(f"unknown device {name!r}; choose cpu or cuda")
    return torch.device(name)


def evaluate_elbo(vae: VAE, x: torch.Tensor, seed: int, num_particles: int = 1) -> float:
    """Mean ELBO per data point, with Monte Carlo draws from a fixed seed."""
    vae.eval()
    with seeded(seed, x.device), pyro.validation_enabled(False):  # as the training step: a NaN shows in the mean
        return elbo_per_datapoint(vae, x, num_particles).mean().item()


# --------------------------------------------------------------------------- set-up


def _setup(config: Config, data: Dataset | None, prior, trust_prior: bool = True) -> tuple[VAE, Dataset, Config]:
    """Validate, load the data, build the model on its device and check the objective: every check on
    the input, before anything is written. The config comes back with the folder a prior of your own
    was imported from (``prior_path``), so that the run reloads from anywhere."""
    config.validate()
    device = resolve_device(config.device)
    if data is None:
        data = load_dataset(config.dataset, config.data_root, download=config.download)
    check_step_fits(config, data.dim, len(data.train))
    pyro.set_rng_seed(config.seed)
    vae = build_vae(config, data.dim, data.image_shape, data.binary, prior=prior, trust_prior=trust_prior)
    if config.prior_init == "data":  # before the move: the draw is on the CPU, from the run's seed
        vae.prior.initialise_from_data(data.train, config.seed)
    vae = vae.to(device)
    check_objective(config, vae, data.valid[:1].to(device))
    if prior is None and ":" in config.prior and config.prior_path is None:
        config = dataclasses.replace(config, prior_path=module_folder(config.prior))
    return vae, data, config


def train(config: Config, out: str | os.PathLike | None = None, *, data: Dataset | None = None, prior=None,
          progress: bool = True, on_epoch_end=None) -> Run:
    """Train a VAE as ``config`` describes and write its run directory (default ``runs/<name>-<time>``).

    Every check on the input runs before anything is written. ``prior`` (an object) overrides
    ``config.prior``; ``on_epoch_end(epoch, record)`` is called after each epoch, once its files are handed to the
    background writer (they are on disk when this returns or raises)."""
    if prior is not None:
        ref = prior_reference(prior)
        args = config.prior_args if inspect.isfunction(prior) or inspect.isclass(prior) else ref.args
        config = dataclasses.replace(config, prior=ref.name, prior_args=args if ref.name != OBJECT_PRIOR else {},
                                     prior_path=ref.path)
    vae, data, config = _setup(config, data, prior)
    out = Path(out) if out is not None else default_run_path(config)
    check_output_dir(out, "--out")
    files = RunFiles(out)
    restart = files.unfinished_start()  # a run that never finished an epoch may start again, as anything
    if out.exists() and any(out.iterdir()) and not restart:
        raise PyroVAEError(f"{out} already exists and is not empty (resume it with --resume {out}, or pick --out)")
    out.mkdir(parents=True, exist_ok=True)
    with files.training_lock():
        if restart:
            files.clear_unfinished_start()
        return _start(vae, config, data, files, progress, on_epoch_end)


def _start(vae: VAE, config: Config, data: Dataset, files: RunFiles, progress, on_epoch_end) -> Run:
    """Write config.json and run.json of a new run, then train it from epoch 1."""
    files.write_config(config)
    info = {
        "data": {"name": data.name, "dim": data.dim, "image_shape": list(data.image_shape), "binary": data.binary,
                 "n_train": len(data.train), "n_valid": len(data.valid), "n_test": len(data.test)},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "pyro": pyro.__version__},
    }
    files.set_status(info, "running")
    return _fit(vae, config, data, files, info, checkpoint=None, progress=progress, on_epoch_end=on_epoch_end)


def resume(path: str | os.PathLike, *, data: Dataset | None = None, prior=None, epochs: int | None = None,
           jit: bool | None = None, trust: bool = False, progress: bool = True, on_epoch_end=None) -> Run:
    """Continue an interrupted run from the end of its last finished epoch (or train it for more ``epochs``;
    ``jit=False`` goes on with the Python ELBO). A run that never finished an epoch starts again from
    epoch 1 with its config. ``trust``: allow importing a prior its config.json names as module:attribute
    (see :func:`~pyro_vae.run_dir.load_run`)."""
    files = RunFiles(path)
    if not (files / "config.json").is_file():
        raise PyroVAEError(f"{files.path} holds no resumable run (no config.json)")
    files.clean_temporary()
    config = files.read_config()
    if epochs is not None:
        config = dataclasses.replace(config, epochs=epochs)
    if jit is not None:
        config = dataclasses.replace(config, jit=jit)
    if not files.has_checkpoint() and not files.unfinished_start():
        raise PyroVAEError(f"{files.path} holds no resumable run (no checkpoint.pt)")
    info = files.read_info()
    try:
        vae, data, config = _setup(config, data, prior_for(config, prior, files.path), trust_prior=trust)
    except UntrustedPrior as e:
        raise PyroVAEError(f"{files.path} was trained with a prior of its own: {e}") from None
    with files.training_lock():
        if not files.has_checkpoint():  # no epoch ever finished: begin again
            files.clear_unfinished_start()
            return _start(vae, config, data, files, progress, on_epoch_end)
        checkpoint = files.load_checkpoint(vae.device)
        vae.load_state_dict(checkpoint.model)
        if info.get("status") == "finished" and (epochs is None or config.epochs <= checkpoint.epoch):
            how = (f"stopped early at epoch {checkpoint.epoch}" if info.get("stopped_early")
                   else f"finished {checkpoint.epoch} epochs")
            raise PyroVAEError(f"{files.path} {how}; to train it on, pass --epochs above {checkpoint.epoch}")
        files.write_config(config)
        return _fit(vae, config, data, files, info, checkpoint=checkpoint, progress=progress,
                    on_epoch_end=on_epoch_end)


def default_run_path(config: Config) -> Path:
    name = Path(config.dataset).stem if config.dataset.endswith((".npy", ".pt", ".pth")) else config.dataset
    prior = config.prior.replace(":", "_").replace("<", "").replace(">", "")
    return Path("runs") / f"{name}-{prior}-z{config.latent_dim}-{time.strftime('%Y%m%d-%H%M%S')}"


# --------------------------------------------------------------------------- the step, compiled or not


def _compile_or_fall_back(vae: VAE, config: Config, weight: KLWeight, train_x: torch.Tensor,
                          steps: int) -> TrainingStep:
    """The training step with its ELBO compiled (torch.compile for the direct ELBO, torch.jit for Pyro's) on
    each batch shape of an epoch, or, where the compiler cannot follow the model, the same ELBO uncompiled,
    with the reason (``step.not_compiled``). ``steps``: how many training steps the run has."""
    step = TrainingStep(vae, config, weight, steps=steps)
    if step.not_compiled is not None:
        return step
    n, bs = len(train_x), config.batch_size
    shapes = [train_x[:bs]] + ([train_x[: n % bs]] if n % bs and n > bs else [])
    try:
        step.compile(shapes, seed=config.seed + 3 * EVAL_SEED_OFFSET, binarize=config.binarize)
    except Exception as e:  # a model the compiler cannot follow: train it with the uncompiled ELBO
        first = first_line(e)
        for p in vae.parameters():
            p.grad = None
        compiler = step.compiler
        step = TrainingStep(vae, config, weight, jit=False)
        step.not_compiled = f"{compiler} could not compile it ({type(e).__name__}: {first})"
    return step


# --------------------------------------------------------------------------- the loop


@dataclass
class _Progress:
    """What the loop carries from epoch to epoch (and a checkpoint stores)."""

    history: list
    start_epoch: int = 0
    best: float = -math.inf
    best_epoch: int | None = None
    stale: int = 0


def _restore(step: TrainingStep, checkpoint: Checkpoint | None, device: torch.device) -> _Progress:
    """The optimizer, the schedule, the random streams and the loop's progress as the checkpoint left them."""
    if checkpoint is None:
        return _Progress(history=[])
    step.load_state_dict(checkpoint.optim)
    torch.set_rng_state(checkpoint.rng["cpu"])
    if device.type == "cuda" and checkpoint.rng.get("cuda") is not None:
        torch.cuda.set_rng_state(checkpoint.rng["cuda"], device)
    return _Progress(history=checkpoint.history, start_epoch=checkpoint.epoch, best=checkpoint.best,
                     best_epoch=checkpoint.best_epoch, stale=checkpoint.stale)


def _train_epoch(step: TrainingStep, weight: KLWeight, vae: VAE, train_x: torch.Tensor, config: Config,
                 epoch: int, bar, kept: str) -> float:
    """One pass over the training set in a random order; the mean training loss per data point.
    A non-finite loss raises :class:`TrainingDiverged` (``kept`` says what stays loadable)."""
    vae.train()
    n, bs = len(train_x), config.batch_size
    steps = math.ceil(n / bs)
    perm = torch.randperm(n, device=train_x.device)
    total = 0.0
    for i in range(steps):
        weight.update(epoch + i / steps)
        xb = train_x[perm[i * bs : (i + 1) * bs]]
        if config.binarize:
            xb = torch.bernoulli(xb)
        try:
            loss = step.step(xb)
        except ValueError:  # with validation on, NaN parameters fail the distributions' checks
            if all(torch.isfinite(p).all() for p in vae.parameters()):
                raise
            loss = math.nan
        if not math.isfinite(loss):
            raise TrainingDiverged(f"the loss became {loss} at epoch {epoch + 1}, step {i + 1}; training stopped. "
                                   + kept)
        total += loss
        bar.update()
    return total / n


PRIOR_FOLLOW_POINTS = 5000
"""Training images (a random subset, new each epoch) whose codes a prior's ``after_epoch`` hook sees."""


def _prior_after_epoch(vae: VAE, train_x: torch.Tensor, seed: int) -> dict | None:
    """The prior's :meth:`~pyro_vae.models.base.Prior.after_epoch` on the codes of a random subset of
    :data:`PRIOR_FOLLOW_POINTS` training images, drawn from a stream of ``seed`` (the training stream is
    left where it was, so a resumed run draws what the uninterrupted one drew)."""
    if type(vae.prior).after_epoch is Prior.after_epoch:
        return None
    vae.eval()
    with seeded(seed, train_x.device), torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(train_x), generator=gen)[:PRIOR_FOLLOW_POINTS].to(train_x.device)
        return vae.prior.after_epoch(vae.guide_dist, train_x[pick], gen)


def _select_and_save(vae: VAE, step: TrainingStep, config: Config, files: RunFiles, info: dict,
                     state: _Progress, record: dict, valid_x: torch.Tensor) -> None:
    """Score the epoch (the validation ELBO; the beta-ELBO when beta != 1, the objective being trained),
    move the learning-rate schedule, keep the best weights, and write the history, the checkpoint and
    run.json."""
    score = record["valid_elbo"]
    if config.beta != 1.0:  # beta-ELBO = ELBO + (1 - beta) rate
        score += (1.0 - config.beta) * _mean_rate(vae, valid_x, config.seed)
        record["valid_beta_elbo"] = score
    record["lr"] = step.lr
    step.end_epoch(score)
    state.history.append(record)
    epoch = record["epoch"]
    improved = score > state.best
    if improved:
        state.best, state.best_epoch, state.stale = score, epoch, 0
    elif epoch > config.warmup_epochs:  # the objective still moves during warm-up: patience starts after it
        state.stale += 1
    device = vae.device
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    selected_by = "validation ELBO" if config.beta == 1.0 else f"validation beta-ELBO (beta={config.beta:g})"
    # written by a worker thread while the next epoch trains; _loop waits for it before it finishes or stops
    files.save_epoch(info, state.history,
                     Checkpoint(model=vae.state_dict(), optim=step.state_dict(), rng=rng, epoch=epoch,
                                history=state.history, best=state.best, best_epoch=state.best_epoch,
                                stale=state.stale),
                     best=improved, status="running", epochs_completed=epoch, best_epoch=state.best_epoch,
                     best_valid_elbo=state.history[state.best_epoch - 1]["valid_elbo"], selected_by=selected_by)


def _fit(vae: VAE, config: Config, data: Dataset, files: RunFiles, info: dict, checkpoint, progress,
         on_epoch_end) -> Run:
    """Train from ``checkpoint`` (None: from the start) to the end, and finish. Whatever stops it, run.json
    says how: interrupted, diverged, or failed with the error."""
    try:
        return _loop(vae, config, data, files, info, checkpoint, progress, on_epoch_end)
    except KeyboardInterrupt:
        files.set_status(info, "interrupted")
        done = info.get("epochs_completed", 0)
        kept = (f"the checkpoint of epoch {done} is kept" if done else "no epoch had finished, so nothing was kept")
        raise RunInterrupted(f"interrupted; {kept}: continue with pyro-vae train --resume {files.path}"
                             + ("" if done else " (it starts again at epoch 1)")) from None
    except TrainingDiverged:
        files.set_status(info, "diverged")
        raise
    except BaseException as e:
        files.set_status(info, "failed", error=f"{type(e).__name__}: {e}"[:500])
        raise


def _loop(vae: VAE, config: Config, data: Dataset, files: RunFiles, info: dict, checkpoint, progress,
          on_epoch_end) -> Run:
    device = vae.device
    pyro.clear_param_store()
    weight = KLWeight(config.beta, config.warmup_epochs, device)
    train_x = data.train.to(device)
    held_out = {s: data.as_seen(s, config.binarize)[0].to(device) for s in ("valid", "test")}
    steps = math.ceil(len(train_x) / config.batch_size)
    step = _compile_or_fall_back(vae, config, weight, train_x, steps * config.epochs)
    info.update(elbo=step.elbo_name, compiled=step.not_compiled is None, compiler=step.compiler,
                optimizer="torch.optim.Adam")
    for key, reason in (("not_compiled_because", step.not_compiled), ("not_direct_because", step.not_direct)):
        info.pop(key, None)
        if reason is not None and not (key == "not_direct_because" and config.elbo == "pyro"):
            info[key] = reason
    state = _restore(step, checkpoint, device)

    bar = Progress(progress, config.epochs, steps, state.start_epoch, files.path.name)
    tracker = Tracker(config.log, files, config, info)
    stopped_early, outcome = False, "failed"
    try:
        for epoch in range(state.start_epoch, config.epochs):
            started = time.perf_counter()
            kept = _kept(files.path, state.best_epoch)
            train_loss = _train_epoch(step, weight, vae, train_x, config, epoch, bar, kept)
            followed = _prior_after_epoch(vae, train_x, config.seed + 4 * EVAL_SEED_OFFSET + epoch)
            valid_elbo = evaluate_elbo(vae, held_out["valid"], seed=config.seed + EVAL_SEED_OFFSET)
            if not math.isfinite(valid_elbo):
                raise TrainingDiverged(f"the validation ELBO became {valid_elbo} at epoch {epoch + 1}. " + kept)
            record = {"epoch": epoch + 1, "train_loss": train_loss, "valid_elbo": valid_elbo, "beta": weight.value,
                      "seconds": time.perf_counter() - started, **(followed or {})}
            _select_and_save(vae, step, config, files, info, state, record, held_out["valid"])
            bar.epoch(record, state.best)
            tracker.log(state.history)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)
            if config.patience and state.stale >= config.patience:
                stopped_early = True
                break
        outcome = "finished"
    except KeyboardInterrupt:
        outcome = "interrupted"
        raise
    finally:
        try:
            files.writes.wait()  # the last epoch's files are on disk before the run finishes or stops
        except KeyboardInterrupt:
            outcome = "interrupted"
            raise
        except BaseException:
            outcome = "failed"
            raise
        finally:
            bar.close()
            tracker.close(outcome)
    return _finish(vae, config, data, files, info, held_out["test"], stopped_early)


def _finish(vae: VAE, config: Config, data: Dataset, files: RunFiles, info: dict, test_x: torch.Tensor,
            stopped_early: bool) -> Run:
    """Reload the best weights, measure the test ELBO, draw the figures, mark the run finished."""
    from ..plots import save_run_figures

    # the prior object in memory, never the name config.json records: finishing a run imports nothing
    run = load_run(files.path, prior=vae.prior, device=str(vae.device), data=data)
    test_elbo = evaluate_elbo(run.vae, test_x, seed=config.seed + 2 * EVAL_SEED_OFFSET)
    save_run_figures(run, data, test_x)
    run.info = files.set_status(info, "finished", stopped_early=stopped_early, test_elbo=test_elbo,
                                finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return run


def _mean_rate(vae: VAE, x: torch.Tensor, seed: int) -> float:
    """Mean KL(q(z|x) || p(z)) over x, closed form where registered (Monte Carlo draws from a fixed seed)."""
    with seeded(seed + EVAL_SEED_OFFSET, x.device):
        return rate_and_distortion(vae, x, num_particles=4)["rate"].mean().item()


def _kept(out: Path, best_epoch) -> str:
    if best_epoch is None:
        return f"No epoch finished, so nothing was kept; start again with: pyro-vae train --resume {out}."
    return f"The best weights (epoch {best_epoch}) are kept in {out / 'model.pt'}; resume from {out / 'checkpoint.pt'}."
