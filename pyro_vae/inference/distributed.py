"""One run across processes or GPUs: data-parallel training through Lightning Fabric.

    pyro-vae train --devices 2 [--num-nodes 1] [--accelerator cpu|cuda] ...

Every process holds the whole VAE (the same initial weights, from the run's seed) and takes its shard of
each global mini-batch of ``batch_size`` images: Fabric's DDP strategy averages the gradients over the
processes, and each process's loss is the ELBO summed over its shard times the number of processes, so
that the averaged gradient is the gradient of the ELBO summed over the global batch, as one process
would compute it. Pyro's ELBO is the Python one (``Trace_ELBO`` and friends): the compiled ELBO stays
the single-device default, and run.json says which ran. Each process draws its Monte Carlo noise from a
stream of its own (seed + 1 + rank); the order of the data follows the run's seed and the epoch, the same
in every process.

Rank 0 alone writes the run directory (its formats and atomic writes, as a single-process run) and
validates; its scores reach the others by broadcast, so that all stop together. A checkpoint keeps
every rank's random stream, and ``--resume`` continues with the same number of processes.

Launching: on one machine ``pyro-vae train --devices N`` starts the processes itself (Fabric's ``ddp``
launcher runs the same command again for ranks 1..N-1). Under ``torchrun --nproc-per-node N``, or
``srun`` on a SLURM cluster (one task per process, ``--ntasks-per-node`` = devices), Fabric reads the
ranks from the environment and starts nothing. The Python API (``train_distributed``) can also spawn the
processes itself (``strategy="ddp_spawn"``), which is what the tests do.
"""

from __future__ import annotations

import math
import time

import pyro
import torch
from torch import nn

from ..config import Config
from ..data import Dataset, load_dataset
from ..errors import PyroVAEError, RunInterrupted, TrainingDiverged
from ..outputs import check_output_dir
from ..run_dir import Checkpoint, RunFiles
from .objectives import KLWeight, kl_weighted, make_elbo


class ELBOLoss(nn.Module):
    """The ELBO as a loss module, for DDP to wrap: forward(x) = -ELBO summed over x, times ``scale``."""

    def __init__(self, vae, config: Config, weight: KLWeight, scale: float):
        super().__init__()
        self.vae = vae
        self.model = vae.enumerated_model if vae.enumerated else vae.model
        self.guide = vae.guide
        self.extra = ()
        if not weight.constant_one:
            self.model, self.guide, self.extra = kl_weighted(self.model), kl_weighted(self.guide), (weight.tensor,)
        self.elbo = make_elbo(config.objective, config.num_particles, vae.enumerated, jit=False)
        if not hasattr(self.elbo, "differentiable_loss"):
            raise PyroVAEError(f"--devices > 1 needs an ELBO with a differentiable loss; "
                               f"{type(self.elbo).__name__} (--objective {config.objective}) has none")
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.elbo.differentiable_loss(self.model, self.guide, x, *self.extra)


def shard(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous share of a global mini-batch (the last ranks may get one image fewer)."""
    bounds = [round(i * len(batch) / world) for i in range(world + 1)]
    return batch[bounds[rank] : bounds[rank + 1]]


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the training images in an epoch: the same in every process."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def check_devices(devices: int, num_nodes: int, accelerator: str = "cpu") -> None:
    """``--devices`` and ``--num-nodes`` are whole numbers >= 1; on one node, ``devices`` CPU processes fit
    the cores and ``accelerator="cuda"`` needs as many GPUs: refused before a process starts."""
    import os

    if devices < 1 or num_nodes < 1:
        raise PyroVAEError(f"--devices and --num-nodes must be >= 1, got {devices} and {num_nodes}")
    if devices == 1 or num_nodes > 1:
        return
    if accelerator == "cuda":
        if torch.cuda.device_count() < devices:
            raise PyroVAEError(f"--devices {devices} --accelerator cuda needs {devices} GPUs; "
                               f"{torch.cuda.device_count()} found")
    elif devices > (os.cpu_count() or 1):
        raise PyroVAEError(f"--devices {devices} CPU processes on a machine of {os.cpu_count()} cores: "
                           f"use at most {os.cpu_count()}")


def _check_start(files: RunFiles, resume: bool, world: int | None = None) -> None:
    """The run directory can take what is asked: a checkpoint to resume (of ``world`` processes, where
    given), or an empty (or absent) folder."""
    if resume:
        if not files.has_checkpoint():
            raise PyroVAEError(f"{files.path} holds no checkpoint to resume")
        if world is not None:
            rng = files.load_checkpoint("cpu").rng
            ranks = rng.get("ranks") if isinstance(rng, dict) else None
            if not ranks or len(ranks) != world:
                raise PyroVAEError(f"{files.path} was trained on {len(ranks) if ranks else 1} process(es); resume it "
                                   f"with the same --devices x --num-nodes (not {world})")
    elif files.path.exists() and any(files.path.iterdir()):
        raise PyroVAEError(f"{files.path} already exists and is not empty")


def train_distributed(config: Config, out, *, devices: int, num_nodes: int = 1, accelerator: str = "cpu",
                      strategy: str = "ddp", data: Dataset | None = None, resume: bool = False, trust: bool = False,
                      progress: bool = True):
    """Train ``config`` data-parallel on ``devices`` x ``num_nodes`` processes; see the module docstring.
    ``resume``: continue the run in ``out`` (its config.json's prior is imported only with ``trust``).
    Returns the run in the process that launched the others (or rank 0's under torchrun/SLURM), else None."""
    try:
        from lightning_fabric import Fabric
    except ImportError:
        raise PyroVAEError("--devices > 1 needs Lightning Fabric: pip install 'pyro-vae[scale]'") from None
    if devices < 1 or num_nodes < 1:
        raise PyroVAEError("--devices and --num-nodes must be >= 1")
    unsupported = [what for what, bad in (
        (f"--prior {config.prior}", config.prior == "mog-enum"), ("--prior-init data", config.prior_init == "data"),
        (f"--lr-schedule {config.lr_schedule}", config.lr_schedule != "constant"),
        (f"--optimizer {config.optimizer}", config.optimizer != "adam"),
        (f"--beta {config.beta:g} (selection by the beta-ELBO)", config.beta != 1.0),
        ("--prior-reseed (the prior's after-epoch hook)", config.prior_reseed and config.prior in ("mog", "mog-enum"))
    ) if bad]
    if unsupported:
        raise PyroVAEError(f"--devices > 1 does not support {', '.join(unsupported)} yet: train on one device")
    config.validate()
    check_output_dir(out, "--out")
    trusted = trust or not resume  # a new run's config is the caller's; a resumed run's comes from its file
    if not trusted and ":" in config.prior and config.prior != "<object>":
        from ..models.user_priors import UntrustedPrior

        raise PyroVAEError(f"{out} was trained with a prior of its own: {UntrustedPrior(config.prior)}")
    _check_start(RunFiles(out), resume, devices * num_nodes)  # before Fabric starts a process: said once
    if data is None:
        data = load_dataset(config.dataset, config.data_root, download=config.download)
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy)
    if strategy == "ddp_spawn":
        path = fabric.launch(_worker, config, str(out), data, resume, trusted, progress)
    else:
        fabric.launch()
        path = _worker(fabric, config, str(out), data, resume, trusted, progress)
    if path is None:
        return None
    from ..run_dir import load_run

    return load_run(path, trust=trusted, data=data)  # the run these processes trained


def _worker(fabric, config: Config, out: str, data: Dataset, resume: bool, trusted: bool, progress: bool):
    from contextlib import ExitStack

    from ..models.vae import build_vae

    rank, world = fabric.global_rank, fabric.world_size
    files = RunFiles(out)
    with ExitStack() as stack:
        checkpoint = _start_or_restore(fabric, files, config, data, resume, world, stack)
        info = files.read_info() if rank == 0 else {}
        try:
            torch.manual_seed(config.seed)
            pyro.set_rng_seed(config.seed)
            vae = build_vae(config, data.dim, data.image_shape, data.binary, trust_prior=trusted)
            if checkpoint is not None:
                vae.load_state_dict(checkpoint.model)
            weight = KLWeight(config.beta, config.warmup_epochs)
            loss = ELBOLoss(vae, config, weight, scale=float(world))
            optim = torch.optim.Adam(vae.parameters(), lr=config.lr)
            loss, optim = fabric.setup(loss, optim)
            weight.tensor = weight.tensor.to(fabric.device)
            if loss.extra:
                loss.extra = (weight.tensor,)
            state = {"history": [], "epoch": 0, "best": -math.inf, "best_epoch": None, "stale": 0}
            if checkpoint is not None:
                optim.load_state_dict(checkpoint.optim["optim"])
                torch.set_rng_state(checkpoint.rng["ranks"][rank].clone().contiguous())
                if fabric.device.type == "cuda" and checkpoint.rng.get("cuda_ranks"):
                    torch.cuda.set_rng_state(checkpoint.rng["cuda_ranks"][rank].clone().contiguous(), fabric.device)
                state.update(history=checkpoint.history, epoch=checkpoint.epoch, best=checkpoint.best,
                             best_epoch=checkpoint.best_epoch, stale=checkpoint.stale)
            else:
                torch.manual_seed(config.seed + 1 + rank)  # this rank's Monte Carlo stream (CPU and GPU)
            _loop(fabric, vae, loss, optim, weight, config, data, files, info, state, progress)
            fabric.barrier()
            if rank != 0:
                return None
            from .train import _finish

            _finish(vae.to(fabric.device), config, data, files, info,
                    data.as_seen("test", config.binarize)[0].to(fabric.device), info.get("stopped_early", False))
            return str(files.path)  # a path, not the model: spawned processes hand back plain values
        except KeyboardInterrupt:
            if rank == 0:
                files.set_status(info, "interrupted")
            raise RunInterrupted(f"interrupted; continue with pyro-vae train --resume {out} --devices {world}") \
                from None
        except TrainingDiverged:
            if rank == 0:
                files.set_status(info, "diverged")
            raise
        except BaseException as e:
            if rank == 0:
                files.set_status(info, "failed", error=f"{type(e).__name__}: {e}"[:500])
            raise


def _start_or_restore(fabric, files: RunFiles, config: Config, data: Dataset, resume: bool, world: int, stack):
    """Rank 0 checks the directory, takes the training lock and writes a new run's config.json and
    run.json; its verdict reaches every rank (all raise together, none waits for a rank that stopped).
    A resumed run's checkpoint is then read by every rank."""
    problem = None
    if fabric.global_rank == 0:
        try:
            _rank0_start(files, config, data, resume, world, stack)
        except PyroVAEError as e:
            problem = str(e)
    problem = fabric.broadcast(problem, src=0)
    if problem:
        raise PyroVAEError(problem)
    if not resume:
        return None
    checkpoint = files.load_checkpoint("cpu")
    ranks = checkpoint.rng.get("ranks") if isinstance(checkpoint.rng, dict) else None
    if not ranks or len(ranks) != world:  # the same on every rank: all raise
        raise PyroVAEError(f"{files.path} was trained on {len(ranks) if ranks else 1} process(es); resume it "
                           f"with the same --devices x --num-nodes (not {world})")
    return checkpoint


def _rank0_start(files: RunFiles, config: Config, data: Dataset, resume: bool, world: int, stack) -> None:
    import platform

    out = files.path
    _check_start(files, resume)
    if resume:
        stack.enter_context(files.training_lock())
        return
    out.mkdir(parents=True, exist_ok=True)
    stack.enter_context(files.training_lock())
    files.write_config(config)
    files.set_status({
        "data": {"name": data.name, "dim": data.dim, "image_shape": list(data.image_shape), "binary": data.binary,
                 "n_train": len(data.train), "n_valid": len(data.valid), "n_test": len(data.test)},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "pyro": pyro.__version__},
        "elbo": type(make_elbo(config.objective, config.num_particles)).__name__, "compiled": False,
        "not_compiled_because": f"data-parallel training on {world} processes runs Pyro's Python ELBO",
        "optimizer": "torch.optim.Adam", "devices": world}, "running")


CONTINUE, STOP, FAILED, DIVERGED = 0, 1, 2, 3


def _loop(fabric, vae, loss, optim, weight, config: Config, data: Dataset, files: RunFiles, info: dict, state: dict,
          progress: bool) -> None:
    from .train import EVAL_SEED_OFFSET, evaluate_elbo

    rank, world, device = fabric.global_rank, fabric.world_size, fabric.device
    x = data.train.to(device)
    valid_x = data.as_seen("valid", config.binarize)[0].to(device)
    n, bs = len(x), config.batch_size
    steps = math.ceil(n / bs)
    for epoch in range(state["epoch"], config.epochs):
        started = time.perf_counter()
        order = epoch_order(n, config.seed, epoch).to(device)
        total = torch.zeros((), device=device)
        vae.train()
        for i in range(steps):
            weight.update(epoch + i / steps)
            xb = shard(x[order[i * bs : (i + 1) * bs]], rank, world)
            if config.binarize:
                xb = torch.bernoulli(xb)
            value = loss(xb)
            fabric.backward(value)
            if config.clip_norm:
                torch.nn.utils.clip_grad_value_(vae.parameters(), config.clip_norm)
            optim.step()
            optim.zero_grad(set_to_none=True)
            total += value.detach() / world
        total = fabric.all_reduce(total, reduce_op="sum")
        if not math.isfinite(total.item()):  # the same sum on every rank: all raise
            raise TrainingDiverged(f"the loss became {total.item()} at epoch {epoch + 1}; training stopped")
        rngs = {"ranks": fabric.all_gather(torch.get_rng_state().to(device))}  # every rank's stream, for the checkpoint
        if device.type == "cuda":
            rngs["cuda_ranks"] = fabric.all_gather(torch.cuda.get_rng_state(device).to(device))
        verdict, error = torch.tensor(CONTINUE, device=device), None
        if rank == 0:  # rank 0 alone validates and writes; whatever happens, every rank hears the verdict
            try:
                record = {"epoch": epoch + 1, "train_loss": total.item() / n, "beta": weight.value,
                          "valid_elbo": evaluate_elbo(vae, valid_x, seed=config.seed + EVAL_SEED_OFFSET),
                          "lr": config.lr, "seconds": time.perf_counter() - started}
                if not math.isfinite(record["valid_elbo"]):
                    raise TrainingDiverged(f"the validation ELBO became {record['valid_elbo']} at epoch {epoch + 1}")
                verdict.fill_(STOP if _save_epoch(vae, optim, config, files, info, state, record, rngs) else CONTINUE)
                if progress:
                    print(f"epoch {epoch + 1}/{config.epochs}: validation ELBO {record['valid_elbo']:.3f} "
                          f"(best {state['best']:.3f}), {world} processes", flush=True)
            except TrainingDiverged as e:
                verdict.fill_(DIVERGED)
                error = e
            except Exception as e:
                verdict.fill_(FAILED)
                error = e
        verdict = int(fabric.broadcast(verdict, src=0).item())
        if verdict == DIVERGED:
            raise error or TrainingDiverged(f"rank 0 found the validation ELBO not finite at epoch {epoch + 1}")
        if verdict == FAILED:
            raise error or RuntimeError(f"rank 0 failed at the end of epoch {epoch + 1}")
        if verdict == STOP:
            info["stopped_early"] = True
            break


def _save_epoch(vae, optim, config: Config, files: RunFiles, info: dict, state: dict, record: dict, rngs) -> int:
    """Rank 0: select the best weights, write history, checkpoint and run.json; 1 to stop early."""
    state["history"].append(record)
    epoch = record["epoch"]
    if record["valid_elbo"] > state["best"]:
        state.update(best=record["valid_elbo"], best_epoch=epoch, stale=0)
        files.save_weights(vae.state_dict())
    elif epoch > config.warmup_epochs:
        state["stale"] += 1
    files.write_history(state["history"])
    rng = {key: [r.cpu().clone().contiguous() for r in (value if value.dim() > 1 else value[None])]  # own storage
           for key, value in rngs.items()}
    files.save_checkpoint(Checkpoint(model=vae.state_dict(), optim={"optim": optim.state_dict(), "schedule": None},
                                     rng={"cpu": rng["ranks"][0], "cuda": None, **rng}, epoch=epoch,
                                     history=state["history"], best=state["best"], best_epoch=state["best_epoch"],
                                     stale=state["stale"]))
    files.set_status(info, "running", epochs_completed=epoch, best_epoch=state["best_epoch"],
                     best_valid_elbo=state["history"][state["best_epoch"] - 1]["valid_elbo"],
                     selected_by="validation ELBO")
    return int(bool(config.patience) and state["stale"] >= config.patience)


__all__ = ["train_distributed", "ELBOLoss", "shard", "epoch_order"]
