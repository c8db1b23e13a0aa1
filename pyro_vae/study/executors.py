"""Where a study's runs execute: here, one after another (``local``), or as Ray tasks (``ray``), from a
laptop to a cluster. Every run is independent: a task trains (or resumes) one setting and evaluates it
into ``<out>/runs/<name>``, exactly as the local executor does, so that a study can move between them
and be started again with either.

On a cluster the study directory must be on a filesystem every worker shares (NFS, a mounted bucket):
each task writes its run there, and the driver, which writes the report, reads them back. A probe task
checks that before any work and refuses clearly when a worker cannot write to it.

A task pins torch to its CPUs (``torch.set_num_threads(cpus_per_run)``): two torch processes with
default threads on the same cores slow each other down tenfold or more. The local executor pins the
same way when ``cpus_per_run`` is given, so that both give the same numbers to the last bit.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path


from ..errors import PyroVAEError
from ..run_dir import RunFiles, load_run
from .settings import Setting
from ..inference.tracking import bar as _bar

EXECUTORS = ("local", "ray")


def run_setting(out: str | Path, setting: Setting, k: int, threads: int | None = None, progress: bool = False) -> None:
    """Train, resume or skip one setting's run, then evaluate it if it is not yet (one task)."""
    import torch

    from ..inference.evaluate import evaluate
    from ..inference.train import resume, train

    if threads:
        torch.set_num_threads(threads)
    files = RunFiles(Path(out) / "runs" / setting.name)
    path = files.path
    status = files.read_info().get("status")
    if status != "finished":
        if files.has_checkpoint() and status in ("interrupted", "running"):
            resume(path, progress=progress, trust=True)  # its config is this setting's, named by the caller
        else:
            if path.exists():  # a start that wrote nothing useful: begin again
                clear(path)
            train(setting.config, path, progress=progress)
    if not files.has_metrics():
        evaluate(load_run(path, trust=True), num_particles=k, progress=progress)


def _task(out: str, setting: Setting, k: int, threads: int | None) -> dict:
    """A Ray task: :func:`run_setting`, with its failure returned rather than raised (the others go on)."""
    try:
        run_setting(out, setting, k, threads)
        return {"name": setting.name, "error": None}
    except BaseException as e:  # noqa: BLE001 - reported with the study, never lost
        line = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        return {"name": setting.name, "error": line, "traceback": traceback.format_exc()[-2000:]}


def _probe(out: str) -> str | None:
    """From a worker: None if it can write into the study directory, else why not."""
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        probe = Path(out) / f".probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
        return None
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def run_local(out: Path, settings: list[Setting], k: int, threads: int | None, progress: bool) -> dict[str, str]:
    """Every setting here, one after another; the first failure stops the study (as it always has)."""
    bar = _bar(settings, desc="study", unit="run", enabled=progress)
    for s in bar:
        bar.set_postfix_str(s.name)
        run_setting(out, s, k, threads, progress)
    bar.close()
    return {}


def run_ray(out: Path, settings: list[Setting], k: int, *, address: str | None, cpus: int, gpus: float,
            progress: bool) -> dict[str, str]:
    """Every setting as a Ray task (``cpus`` CPUs and ``gpus`` GPUs each), progress over finished runs;
    returns the failed settings' errors (the others finish)."""
    try:
        import ray
    except ImportError:
        raise PyroVAEError("--executor ray needs Ray: pip install 'pyro-vae[scale]'") from None
    env = {k_: v for k_, v in os.environ.items() if k_.startswith("PYRO_VAE_") or k_ == "PYTHONPATH"}
    started_here = not ray.is_initialized()
    if started_here:
        kw = {"address": address} if address else {"num_cpus": max(cpus, os.cpu_count() or 1)}
        ray.init(**kw, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": env} if env else None)
    try:
        where = str(Path(out).resolve())
        problem = ray.get(ray.remote(num_cpus=0)(_probe).remote(where))
        if problem:
            raise PyroVAEError(f"a Ray worker cannot write to the study directory {where} ({problem}): on a cluster "
                               "it must be on a filesystem every worker shares")
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(_task)
        names = {}
        for s in settings:
            names[task.remote(where, s, k, cpus)] = s.name
        pending = list(names)
        failures = {}
        with _bar(total=len(pending), desc="study (ray)", unit="run", enabled=progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayError as e:  # the worker died (killed, out of memory): no result came back
                    result = {"name": names[done[0]], "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                if result["error"]:
                    failures[result["name"]] = result["error"]
                    bar.write(f"run {result['name']} failed: {result['error']}")
                bar.update()
        return failures
    finally:
        if started_here:
            ray.shutdown()


def clear(path: Path) -> None:
    """Remove a run directory (a start that wrote nothing useful, or a stale run being restarted)."""
    for f in sorted(path.rglob("*"), reverse=True):
        f.rmdir() if f.is_dir() else f.unlink()
    path.rmdir()
