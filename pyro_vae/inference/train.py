"""The SVI loop: mini-batches of the training set, a validation ELBO each epoch, early stopping,
the best weights and a resumable checkpoint written atomically after every epoch, and a progress bar.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
import warnings
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI
from pyro.optim import ClippedAdam
from tqdm.auto import tqdm

from ..config import Config
from ..data import Dataset, load_dataset
from ..errors import PyroVAEError, TrainingDiverged
from ..models.priors import prior_reference
from ..models.vae import VAE, build_vae
from ..run_dir import (CHECKPOINT, CONFIG, HISTORY, INFO, WEIGHTS, Run, atomic_torch_save, atomic_write_json,
                       load_run, read_json)
from ..seeding import seeded
from .metrics import elbo_per_datapoint, rate_and_distortion
from .objectives import KLWeight, check_objective, kl_weighted, make_elbo, why_not_compiled

EVAL_SEED_OFFSET = 10_007  # validation/test Monte Carlo draws use their own stream, not the training one


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise PyroVAEError("--device cuda was asked for, but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise PyroVAEError(f"unknown device {name!r}; choose cpu or cuda")
    return torch.device(name)


BINARIZATION_SEEDS = {"valid": 0, "test": 1, "train": 2}


def fixed_binarization(x: torch.Tensor, split: str) -> torch.Tensor:
    """One Bernoulli draw per pixel from a seed fixed per split: held-out data stay the same across
    epochs, runs and commands. Drawn on the CPU (binarize before moving data to a GPU)."""
    gen = torch.Generator(device="cpu").manual_seed(BINARIZATION_SEEDS[split])
    return torch.bernoulli(x.cpu(), generator=gen).to(x.device)


def evaluate_elbo(vae: VAE, x: torch.Tensor, seed: int, num_particles: int = 1) -> float:
    """Mean ELBO per data point, with Monte Carlo draws from a fixed seed."""
    vae.eval()
    with seeded(seed, x.device):
        return elbo_per_datapoint(vae, x, num_particles).mean().item()


def train(config: Config, out: str | os.PathLike | None = None, *, data: Dataset | None = None, prior=None,
          progress: bool = True, on_epoch_end=None) -> Run:
    """Train a VAE as ``config`` describes and write its run directory (default ``runs/<name>-<time>``).

    Every check on the input runs before anything is written. ``prior`` (an object) overrides
    ``config.prior``; ``on_epoch_end(epoch, record)`` is called after each epoch's checkpoint."""
    config.validate()
    device = resolve_device(config.device)
    if data is None:
        data = load_dataset(config.dataset, config.data_root, download=config.download)
    if prior is not None:
        config = dataclasses.replace(config, prior=prior_reference(prior))
    pyro.set_rng_seed(config.seed)
    vae = build_vae(config, data.dim, data.image_shape, data.binary, prior=prior).to(device)
    check_objective(config, vae, data.valid[:1].to(device))
    out = Path(out) if out is not None else default_run_path(config)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PyroVAEError(f"{out} already exists and is not empty (resume it with --resume {out}, or pick --out)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CONFIG, config.to_dict())
    info = {
        "status": "running",
        "data": {"name": data.name, "dim": data.dim, "image_shape": list(data.image_shape), "binary": data.binary,
                 "n_train": len(data.train), "n_valid": len(data.valid), "n_test": len(data.test)},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "pyro": pyro.__version__},
    }
    atomic_write_json(out / INFO, info)
    return _fit(vae, config, data, out, info, checkpoint=None, progress=progress, on_epoch_end=on_epoch_end)


def resume(path: str | os.PathLike, *, data: Dataset | None = None, prior=None, epochs: int | None = None,
           jit: bool | None = None, progress: bool = True, on_epoch_end=None) -> Run:
    """Continue an interrupted run from the end of its last finished epoch (or train it for more ``epochs``;
    ``jit=False`` goes on with the Python ELBO)."""
    path = Path(path)
    if not (path / CHECKPOINT).is_file() or not (path / CONFIG).is_file():
        raise PyroVAEError(f"{path} holds no resumable run (no {CONFIG} or {CHECKPOINT})")
    config = Config.from_json((path / CONFIG).read_text())
    if epochs is not None:
        config = dataclasses.replace(config, epochs=epochs)
    if jit is not None:
        config = dataclasses.replace(config, jit=jit)
    config.validate()
    device = resolve_device(config.device)
    info = read_json(path / INFO)
    if data is None:
        data = load_dataset(config.dataset, config.data_root, download=config.download)
    if prior is None and config.prior == "<object>":
        raise PyroVAEError(f"{path} was trained with a prior given as a Python object: pass it again as prior=")
    vae = build_vae(config, data.dim, data.image_shape, data.binary, prior=prior).to(device)
    check_objective(config, vae, data.valid[:1].to(device))
    checkpoint = torch.load(path / CHECKPOINT, map_location=device, weights_only=True)
    vae.load_state_dict(checkpoint["model"])
    if checkpoint["epoch"] >= config.epochs and info.get("status") == "finished":
        raise PyroVAEError(f"{path} already finished {checkpoint['epoch']} epochs; pass more epochs to go on")
    atomic_write_json(path / CONFIG, config.to_dict())
    return _fit(vae, config, data, path, info, checkpoint=checkpoint, progress=progress, on_epoch_end=on_epoch_end)


def default_run_path(config: Config) -> Path:
    name = Path(config.dataset).stem if config.dataset.endswith((".npy", ".pt", ".pth")) else config.dataset
    prior = config.prior.replace(":", "_").replace("<", "").replace(">", "")
    return Path("runs") / f"{name}-{prior}-z{config.latent_dim}-{time.strftime('%Y%m%d-%H%M%S')}"


def make_svi(vae: VAE, config: Config, weight: KLWeight) -> tuple[SVI, tuple]:
    """SVI with ClippedAdam on the configured ELBO (``svi.elbo``), compiled where :func:`why_not_compiled`
    allows, and the extra arguments each step passes after x: (beta,) as a tensor, or () when beta is
    constantly 1 and model and guide run unwrapped. ``svi.step(x, *extra)`` is one training step."""
    model = vae.enumerated_model if vae.enumerated else vae.model
    guide = vae.guide
    extra = ()
    if not weight.constant_one:
        model, guide, extra = kl_weighted(model), kl_weighted(guide), (weight.tensor,)
    elbo = make_elbo(config.objective, config.num_particles, vae.enumerated, why_not_compiled(config) is None)
    svi = SVI(model, guide, ClippedAdam({"lr": config.lr, "clip_norm": config.clip_norm}), elbo)
    svi.elbo = elbo
    return svi, extra


def compile_steps(svi: SVI, vae: VAE, batches: list[torch.Tensor], extra: tuple, seed: int,
                  binarize: bool = False) -> None:
    """Run a compiled ELBO on each batch shape of an epoch before training: it is traced (and the
    profiling executor settles) on a private random stream, and the gradients are dropped. A run
    started here and one resumed here then draw the same training stream, step for step."""
    with seeded(seed, batches[0].device), warnings.catch_warnings():
        # torch 2.14 deprecates torch.jit.trace, which Pyro's Jit*_ELBO use; --no-jit avoids it
        warnings.filterwarnings("ignore", message="`torch.jit.trace` is deprecated", category=FutureWarning)
        for xb in batches:
            xb = torch.bernoulli(xb) if binarize else xb
            for _ in range(2):
                svi.loss_and_grads(svi.model, svi.guide, xb, *extra)
    for p in vae.parameters():
        p.grad = None


def _fit(vae: VAE, config: Config, data: Dataset, out: Path, info: dict, checkpoint, progress, on_epoch_end) -> Run:
    device = vae.device
    pyro.clear_param_store()
    weight = KLWeight(config.beta, config.warmup_epochs, device)
    svi, extra = make_svi(vae, config, weight)
    not_compiled = why_not_compiled(config)

    train_x = data.train.to(device)
    held_out = {s: getattr(data, s) for s in ("valid", "test")}
    if config.binarize:
        held_out = {s: fixed_binarization(x, s) for s, x in held_out.items()}
    held_out = {s: x.to(device) for s, x in held_out.items()}
    n, bs = len(train_x), config.batch_size
    steps = math.ceil(n / bs)
    if not_compiled is None:
        shapes = [train_x[:bs]] + ([train_x[: n % bs]] if n % bs and n > bs else [])
        try:
            compile_steps(svi, vae, shapes, extra, seed=config.seed + 3 * EVAL_SEED_OFFSET, binarize=config.binarize)
        except Exception as e:  # a model the tracer cannot follow: train it with the Python ELBO
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            not_compiled = f"torch.jit could not trace it ({type(e).__name__}: {first_line})"
            for p in vae.parameters():
                p.grad = None
            svi, extra = make_svi(vae, dataclasses.replace(config, jit=False), weight)
    optim = svi.optim
    info["elbo"] = type(svi.elbo).__name__
    info["compiled"] = not_compiled is None
    info.pop("not_compiled_because", None)
    if not_compiled is not None:
        info["not_compiled_because"] = not_compiled

    history, start_epoch, best, best_epoch, stale = [], 0, -math.inf, None, 0
    if checkpoint is not None:
        optim.set_state(checkpoint["optim"])
        torch.set_rng_state(checkpoint["rng"]["cpu"].cpu())  # map_location moved it to the device
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"].cpu(), device)
        history, start_epoch = checkpoint["history"], checkpoint["epoch"]
        best, best_epoch, stale = checkpoint["best"], checkpoint["best_epoch"], checkpoint["stale"]

    bar = tqdm(total=config.epochs * steps, initial=start_epoch * steps, disable=not progress, unit="step",
               desc=f"training {out.name}", dynamic_ncols=True)
    stopped_early = False
    try:
        for epoch in range(start_epoch, config.epochs):
            started = time.perf_counter()
            vae.train()
            perm = torch.randperm(n, device=device)
            total = 0.0
            for i in range(steps):
                weight.update(epoch + i / steps)
                xb = train_x[perm[i * bs : (i + 1) * bs]]
                if config.binarize:
                    xb = torch.bernoulli(xb)
                try:
                    loss = svi.step(xb, *extra)
                except ValueError:  # with validation on, NaN parameters fail the distributions' checks
                    if all(torch.isfinite(p).all() for p in vae.parameters()):
                        raise
                    loss = math.nan
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"the loss became {loss} at epoch {epoch + 1}, step {i + 1}; training stopped. "
                        + _kept(out, best_epoch)
                    )
                total += loss
                bar.update()
            valid_elbo = evaluate_elbo(vae, held_out["valid"], seed=config.seed + EVAL_SEED_OFFSET)
            if not math.isfinite(valid_elbo):
                raise TrainingDiverged(f"the validation ELBO became {valid_elbo} at epoch {epoch + 1}. "
                                       + _kept(out, best_epoch))
            record = {"epoch": epoch + 1, "train_loss": total / n, "valid_elbo": valid_elbo,
                      "beta": weight.value, "seconds": time.perf_counter() - started}
            score = valid_elbo
            if config.beta != 1.0:  # select by the objective being trained: beta-ELBO = ELBO + (1 - beta) rate
                score = valid_elbo + (1.0 - config.beta) * _mean_rate(vae, held_out["valid"], config.seed)
                record["valid_beta_elbo"] = score
            history.append(record)
            if score > best:
                best, best_epoch, stale = score, epoch + 1, 0
                atomic_torch_save(out / WEIGHTS, vae.state_dict())
            else:
                stale += 1
            atomic_write_json(out / HISTORY, history)
            rng = {"cpu": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
            atomic_torch_save(out / CHECKPOINT, {
                "model": vae.state_dict(), "optim": optim.get_state(), "rng": rng, "epoch": epoch + 1,
                "history": history, "best": best, "best_epoch": best_epoch, "stale": stale,
            })
            best_elbo = history[best_epoch - 1]["valid_elbo"]
            info.update(status="running", epochs_completed=epoch + 1, best_epoch=best_epoch, best_valid_elbo=best_elbo,
                        selected_by="validation ELBO" if config.beta == 1.0 else f"validation beta-ELBO (beta={config.beta:g})")
            atomic_write_json(out / INFO, info)
            bar.set_postfix(epoch=epoch + 1, valid_elbo=f"{valid_elbo:.2f}", best=f"{best:.2f}")
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)
            if config.patience and stale >= config.patience:
                stopped_early = True
                break
    except KeyboardInterrupt:
        info.update(status="interrupted")
        atomic_write_json(out / INFO, info)
        raise
    except TrainingDiverged:
        info.update(status="diverged")
        atomic_write_json(out / INFO, info)
        raise
    except Exception as e:
        info.update(status="failed", error=f"{type(e).__name__}: {e}"[:500])
        atomic_write_json(out / INFO, info)
        raise
    finally:
        bar.close()

    run = load_run(out, prior=vae.prior if config.prior == "<object>" else None, device=str(device))
    test_elbo = evaluate_elbo(run.vae, held_out["test"], seed=config.seed + 2 * EVAL_SEED_OFFSET)
    from ..plots import save_run_figures

    save_run_figures(run, data, held_out["test"])
    info.update(status="finished", stopped_early=stopped_early, test_elbo=test_elbo,
                finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    atomic_write_json(out / INFO, info)
    run.info = info
    return run


def _mean_rate(vae: VAE, x: torch.Tensor, seed: int) -> float:
    """Mean KL(q(z|x) || p(z)) over x, closed form where registered (Monte Carlo draws from a fixed seed)."""
    with seeded(seed + EVAL_SEED_OFFSET, x.device):
        return rate_and_distortion(vae, x, num_particles=4)["rate"].mean().item()


def _kept(out: Path, best_epoch) -> str:
    if best_epoch is None:
        return "No epoch finished, so no checkpoint was kept."
    return f"The best weights (epoch {best_epoch}) are kept in {out / WEIGHTS}; resume from {out / CHECKPOINT}."
