"""The study's runner: train and evaluate each setting (:mod:`pyro_vae.study.settings`), then report.

Each run lives in ``<out>/runs/<name>``; a run already finished and evaluated is skipped, an
interrupted one resumed, so a study started again picks up where it stopped.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import PyroVAEError
from ..run_dir import atomic_write_json
from .executors import clear
from .settings import Setting, stale_fields


def run_study(kind: str, settings: list[Setting], out: str | Path, *, k: int = 1000, progress: bool = True,
              command: str = "", restart: bool = False, executor: str = "local", ray_address: str | None = None,
              cpus_per_run: int | None = None, gpus_per_run: float = 0.0, published: dict | None = None) -> Path:
    """Train and evaluate every setting (skipping finished ones, resuming interrupted ones), then write
    the report. A run already in ``out`` is reused only if its config.json equals the setting's config;
    otherwise the study stops and names the fields that differ, before any work (``restart=True``
    trains those runs again from scratch).

    ``executor``: ``local`` (here, one run after another) or ``ray`` (each setting a Ray task, on the
    cluster at ``ray_address`` or a local one; see :mod:`pyro_vae.study.executors`), each run pinned to
    ``cpus_per_run`` threads (and ``gpus_per_run`` GPUs under Ray). Under Ray a failed run is reported
    with its error while the others finish; the report covers the finished ones and the study then
    fails naming the others. ``published``: a paper's figures for the same settings (a config file's
    ``[study.published]``, see :mod:`pyro_vae.config_file`), set beside the study's own in the report."""
    from ..config_file import check_published
    from .executors import EXECUTORS, run_local, run_ray
    from .report import write_report

    out = Path(out)
    if k < 1:
        raise PyroVAEError(f"--k must be >= 1, got {k}")
    if executor not in EXECUTORS:
        raise PyroVAEError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    check_resources(executor, ray_address, cpus_per_run, gpus_per_run)
    _check_same_kind(out, kind)
    check_settings(settings, k)
    if published is not None:
        check_published(published)
    stale = [s for s in settings if stale_fields(out, s)]
    if stale and not restart:
        first = stale[0]
        raise PyroVAEError(f"{len(stale)} run(s) in {out / 'runs'} were trained with other settings "
                           f"({first.name}: {', '.join(stale_fields(out, first))}): pass --restart to train them again, "
                           "or pick another --out")
    for s in stale:
        clear(out / "runs" / s.name)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "study.json", {"kind": kind, "command": command, "k": k,
                                           "settings": [{"name": s.name, "label": s.label, "latent_dim": s.latent_dim,
                                                         "seed": s.seed, "config": s.config.to_dict()}
                                                        for s in settings],
                                           **({"published": published} if published else {})})
    if executor == "ray":
        failures = run_ray(out, settings, k, address=ray_address, cpus=cpus_per_run or 1, gpus=gpus_per_run,
                           progress=progress)
    else:
        failures = run_local(out, settings, k, cpus_per_run, progress)
    finished = [s for s in settings if s.name not in failures]
    report = write_report(kind, finished, out, command, failures=failures, published=published) if finished else None
    if failures:
        raise PyroVAEError(f"{len(failures)} of {len(settings)} runs failed ("
                           + "; ".join(f"{name}: {error}" for name, error in failures.items())
                           + (f"); the report covers the others: {report}" if report else ")"))
    return report


RAY_CONNECT_TIMEOUT = 10.0
"""Seconds a study waits for a Ray cluster's address to answer before it says it cannot be reached."""


def check_resources(executor: str, address: str | None, cpus: int | None, gpus: float) -> None:
    """What a study asks of the machine, refused in one line before any work: threads per run within the
    cores (here, or on a Ray cluster started here), GPUs per run a finite number >= 0 that this machine has
    (where no cluster is named), and a cluster address of the form HOST:PORT (or ray://HOST:PORT, or auto)
    whose port answers within :data:`RAY_CONNECT_TIMEOUT` seconds, instead of a Ray call that waits on it."""
    import math
    import os

    if cpus is not None and cpus < 1 or not (math.isfinite(gpus) and gpus >= 0):
        raise PyroVAEError(f"--cpus-per-run must be >= 1 and --gpus-per-run a number >= 0, got {cpus} and {gpus}")
    if cpus is not None and not address and cpus > (os.cpu_count() or 1):
        raise PyroVAEError(f"--cpus-per-run {cpus}: this machine has {os.cpu_count()} cores")
    if gpus > 0 and not address:
        import torch

        if torch.cuda.device_count() < math.ceil(gpus):
            raise PyroVAEError(f"--gpus-per-run {gpus:g}: this machine has {torch.cuda.device_count()} GPUs (name a "
                               "cluster that has them with --ray-address)")
    if address and executor == "ray" and address != "auto":
        _check_ray_address(address)


def _check_ray_address(address: str) -> None:
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PyroVAEError(f"--ray-address {address!r} is not HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_TIMEOUT).close()
    except OSError as e:
        raise PyroVAEError(f"--ray-address {address}: cannot reach the Ray cluster ({type(e).__name__}: "
                           f"{e.strerror or e}; waited at most {RAY_CONNECT_TIMEOUT:g} s)") from None


def _check_same_kind(out: Path, kind: str) -> None:
    """A study directory holds one kind of study: a sweep-beta study never replaces a compare study's
    study.json, report and figures, nor the other way round (refused before any work)."""
    import json

    path = out / "study.json"
    if not path.is_file():
        return
    try:
        held = json.loads(path.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        raise PyroVAEError(f"{path} is not a readable study.json; pick another --out") from None
    if held != kind:
        raise PyroVAEError(f"{out} holds a {held!r} study; a {kind} study would replace its report and "
                           "study.json: pick another --out")


def check_settings(settings: list[Setting], k: int = 1) -> None:
    """Build every setting's model before training any: a bad combination (say, a sphere prior at a
    latent size its guide cannot take) fails at once, not after an hour of the other runs."""
    from ..data import load_dataset
    from ..inference.evaluate import check_evaluation_fits
    from ..models.sizes import check_step_fits
    from ..models.vae import build_vae

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
            check_step_fits(c, data.dim, len(data.train))
            check_evaluation_fits(build_vae(c, data.dim, data.image_shape, data.binary), k, 1000)
        except PyroVAEError as e:
            raise PyroVAEError(f"setting {s.name}: {e}") from None
