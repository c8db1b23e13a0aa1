"""The run directory: everything that reads a trained model starts here, and this module alone knows
its files' formats.

    config.json             the Config, enough to rebuild the model
    run.json                status (running / finished / interrupted / diverged / failed), data shape, best
                            epoch, test ELBO, which ELBO trained it (elbo, compiled, not_compiled_because)
    history.json            one record per epoch
    model.pt                the best weights so far (by validation ELBO)
    checkpoint.pt           the state at the end of the last finished epoch, for --resume
    metrics.json            what ``pyro-vae evaluate`` measured (written after loglik_per_point.npy: a run's
                            evaluation is complete when metrics.json exists)
    loglik_per_point.npy    log p(x) per test point, for paired comparisons
    figures/                samples, reconstructions, learning curves, latent space

Every file is written to a temporary name and renamed into place, so a file that exists is complete.
During training, each epoch's files are written by a worker thread (:class:`BackgroundWrites`) while
the next epoch trains, from copies taken at the end of the epoch; the loop waits for them before it
finishes or stops, and run.json's record names an epoch only once its files are written.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pickle
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import (_UMASK, BackgroundWrites, atomic_path, atomic_torch_save, atomic_write_bytes,  # noqa: F401
                     atomic_write_json, detached_copy, json_bytes)
from .config import Config
from .errors import PyroVAEError, first_line

CONFIG, INFO, HISTORY, WEIGHTS, CHECKPOINT, FIGURES = (
    "config.json", "run.json", "history.json", "model.pt", "checkpoint.pt", "figures",
)
METRICS, PER_POINT = "metrics.json", "loglik_per_point.npy"
LOCK = ".lock"  # held (flock) by the process training the run
OBJECT_PRIOR = "<object>"  # config.json's name for a prior given as an object that cannot be imported by name


def read_json(path) -> Any:
    """A JSON file's contents; :class:`PyroVAEError` naming the file if it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise PyroVAEError(f"{path} is not valid JSON ({str(e)[:80]})") from None


def torch_load(path, what: str, device="cpu") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code; a truncated or
    foreign file is one clear line."""
    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about a legacy (raw pickle) file on two lines; the
            warnings.simplefilter("ignore")  # one line below says what is wrong with it
            return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise PyroVAEError(f"{path} does not exist") from None
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        first = first_line(e, 100)
        raise PyroVAEError(f"{path}: cannot read {what} (truncated, or not a torch file: {first})") from None


@dataclass
class Checkpoint:
    """The state after a finished epoch: enough to continue as if training had never stopped."""

    model: dict
    optim: dict
    rng: dict            # {"cpu": ByteTensor, "cuda": ByteTensor or None}
    epoch: int
    history: list
    best: float
    best_epoch: int | None
    stale: int


STATUSES = ("running", "finished", "interrupted", "diverged", "failed")
"""What run.json's ``status`` may say."""


def _check_info(path: Path, info: dict) -> None:
    """run.json's fields that commands act on have their types and ranges, else one line naming the field:
    a hand-edited ``status: 42`` or ``epochs_completed: -5`` is refused when the run is opened, before a
    resume trains an epoch or a command reads the run as something it is not."""
    status = info.get("status")
    if status is not None and status not in STATUSES:
        raise PyroVAEError(f"{path}: status must be one of {', '.join(STATUSES)}, got {status!r:.40}")
    for key in ("epochs_completed", "best_epoch"):
        value = info.get(key)
        if value is not None and (type(value) is not int or value < 0):
            raise PyroVAEError(f"{path}: {key} must be a whole number >= 0, got {value!r:.40}")
    for key in ("best_valid_elbo", "test_elbo"):
        value = info.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise PyroVAEError(f"{path}: {key} must be a number, got {value!r:.40}")
    for key in ("stopped_early", "compiled"):
        if key in info and not isinstance(info[key], bool):
            raise PyroVAEError(f"{path}: {key} must be true or false, got {info[key]!r:.40}")


class RunFiles:
    """The files of one run directory, read and written in their formats (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.writes = BackgroundWrites()

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # config.json
    def write_config(self, config: Config) -> None:
        atomic_write_json(self.path / CONFIG, config.to_dict())

    def read_config(self) -> Config:
        """config.json, checked against :class:`Config` (types and ranges) as untrusted input."""
        try:
            return Config.from_json((self.path / CONFIG).read_text()).validate()
        except (PyroVAEError, UnicodeDecodeError) as e:
            raise PyroVAEError(f"{self.path / CONFIG}: {e}") from None

    # run.json
    def read_info(self) -> dict:
        """run.json ({} if there is none yet)."""
        if not (self.path / INFO).is_file():
            return {}
        info = read_json(self.path / INFO)
        if not isinstance(info, dict):
            raise PyroVAEError(f"{self.path / INFO}: expected a JSON object, got {type(info).__name__}")
        _check_info(self.path / INFO, info)
        return info

    def read_data_shape(self) -> tuple[int, list[int], bool]:
        """(data dim, image shape, binary) as run.json records them, checked."""
        data = self.read_info().get("data")
        try:
            dim, shape, binary = data["dim"], data["image_shape"], data["binary"]
            ok = (type(dim) is int and dim > 0 and isinstance(shape, list) and len(shape) == 2
                  and all(type(v) is int and v > 0 for v in shape) and shape[0] * shape[1] == dim
                  and isinstance(binary, bool))
        except (TypeError, KeyError):
            ok = False
        if not ok:
            raise PyroVAEError(f"{self.path / INFO}: no valid 'data' record (dim, image_shape, binary)")
        return dim, shape, binary

    def set_status(self, info: dict, status: str, **fields) -> dict:
        """Update ``info`` with the status and fields, and write it as run.json (after any epoch files still
        being written, which would otherwise overwrite it)."""
        self.writes.wait()
        info.update(status=status, **fields)
        atomic_write_json(self.path / INFO, info)
        return info

    # history.json
    def write_history(self, history: list) -> None:
        atomic_write_json(self.path / HISTORY, history)

    def read_history(self) -> list:
        if not (self.path / HISTORY).is_file():
            return []
        history = read_json(self.path / HISTORY)
        if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
            raise PyroVAEError(f"{self.path / HISTORY}: expected a list of per-epoch records")
        for n, record in enumerate(history, 1):
            elbo = record.get("valid_elbo")
            if record.get("epoch") != n or isinstance(elbo, bool) or not isinstance(elbo, (int, float)):
                raise PyroVAEError(f"{self.path / HISTORY}: record {n} is not epoch {n} with a numeric valid_elbo "
                                   f"(edited or mistyped?)")
        return history

    def check_history(self, info: dict) -> None:
        """history.json agrees with run.json: well-formed records, and as many as the epochs a finished run
        completed (a running one may be an epoch ahead: its history is written before its run.json)."""
        history = self.read_history()
        done = info.get("epochs_completed") or 0
        if len(history) < done or (info.get("status") == "finished" and len(history) != done):
            raise PyroVAEError(f"{self.path / HISTORY} holds {len(history)} epochs where run.json records {done} "
                               "(truncated or edited)")

    # model.pt and checkpoint.pt
    def save_weights(self, state_dict: dict) -> None:
        atomic_torch_save(self.path / WEIGHTS, state_dict)

    def load_weights(self) -> dict:
        state = torch_load(self.path / WEIGHTS, "the weights")
        if not isinstance(state, dict):
            raise PyroVAEError(f"{self.path / WEIGHTS}: not a state dict of weights")
        return state

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        atomic_torch_save(self.path / CHECKPOINT, asdict(checkpoint))

    def load_checkpoint(self, device: torch.device | str = "cpu") -> Checkpoint:
        state = torch_load(self.path / CHECKPOINT, "the checkpoint", device)
        try:
            state["rng"] = {k: (v.cpu() if torch.is_tensor(v) else [t.cpu() for t in v] if isinstance(v, list) else v)
                            for k, v in state["rng"].items()}  # RNG states live on the CPU
            return Checkpoint(**state)
        except (TypeError, KeyError, AttributeError):
            raise PyroVAEError(f"{self.path / CHECKPOINT}: not a pyro-vae checkpoint") from None

    def save_epoch(self, info: dict, history: list, checkpoint: Checkpoint, best: bool, **status) -> None:
        """An epoch's files, written in the background (:class:`BackgroundWrites`) in this order: model.pt
        (when the epoch is the ``best`` so far), history.json, checkpoint.pt, then run.json with ``info``
        updated by ``status``; everything is copied first, so training may go on at once. The caller's
        ``info`` takes ``status`` once they are written (at the next ``save_epoch`` or ``set_status``, which
        wait for them), never before: a run stopped or failed meanwhile records the last epoch on disk."""
        self.writes.wait()
        state = detached_copy(checkpoint.__dict__)
        files = [(self.path / WEIGHTS, state["model"])] if best else []
        files += [(self.path / HISTORY, json_bytes(history)), (self.path / CHECKPOINT, state),
                  (self.path / INFO, json_bytes({**info, **status}))]
        self.writes.submit(files, then=lambda: info.update(**status))

    def has_checkpoint(self) -> bool:
        return (self.path / CHECKPOINT).is_file()

    # metrics.json and loglik_per_point.npy
    def write_metrics(self, metrics: dict, loglik_per_point: np.ndarray) -> None:
        """The per-point file first, metrics.json last: metrics.json marks a complete evaluation."""
        buffer = io.BytesIO()
        np.save(buffer, loglik_per_point)
        atomic_write_bytes(self.path / PER_POINT, buffer.getvalue())
        atomic_write_json(self.path / METRICS, metrics)

    def has_metrics(self) -> bool:
        """Whether an evaluation is complete: metrics.json (written last) and the per-point file."""
        return (self.path / METRICS).is_file() and (self.path / PER_POINT).is_file()

    # the training lock and what a killed writer leaves behind
    @contextlib.contextmanager
    def training_lock(self):
        """Hold the run's lock while training it: a second trainer is refused, and a reader can tell a
        run that is being trained from one whose trainer was killed (the kernel drops the lock then)."""
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PyroVAEError(f"{self.path} is being trained by another process right now") from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def being_trained(self) -> bool | None:
        """Whether a process holds the training lock now (None where that cannot be told, e.g. a
        read-only directory or a filesystem without locks)."""
        if not (self.path / LOCK).is_file():
            return False
        try:
            fd = os.open(self.path / LOCK, os.O_RDWR)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
        except OSError:
            return None
        finally:
            os.close(fd)

    def clean_temporary(self, max_age: float = 3600.0) -> list[Path]:
        """Remove the temporary files (``.NAME.*.tmp``) a killed writer left behind: those of the training's
        own files (config, run.json, history, weights, checkpoint) when no training holds the lock, and
        any older than ``max_age`` seconds (a reader such as ``sample`` or ``evaluate`` may be writing the
        others right now). Nothing while a training holds the lock, or where that cannot be told."""
        if not self.path.is_dir() or self.being_trained() is not False:
            return []
        import time

        own = {CONFIG, INFO, HISTORY, WEIGHTS, CHECKPOINT}
        removed = []
        for folder in (self.path, self.path / FIGURES):
            for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
                training_file = folder == self.path and any(tmp.name.startswith(f".{name}.") for name in own)
                try:
                    old = time.time() - tmp.stat().st_mtime > max_age
                except OSError:
                    continue
                if training_file or old:
                    tmp.unlink(missing_ok=True)
                    removed.append(tmp)
        return removed

    def unfinished_start(self) -> bool:
        """Whether the directory holds only a run that never finished an epoch (so it may start again):
        no checkpoint, nothing but its own config, status, tracking and temporary files, and weights only
        if run.json records no finished epoch (an epoch's model.pt and history.json are written before its
        checkpoint and run.json: a kill in between leaves weights of an epoch that never finished)."""
        if not self.path.is_dir() or self.has_checkpoint():
            return False
        if (self.path / WEIGHTS).exists() and self.read_info().get("epochs_completed"):
            return False
        own = {CONFIG, INFO, HISTORY, WEIGHTS, LOCK, "metrics.csv", "tensorboard", "mlruns"}
        return all(p.name in own or (p.name.startswith(".") and p.name.endswith(".tmp")) for p in self.path.iterdir())

    def clear_unfinished_start(self) -> None:
        import shutil

        for p in self.path.iterdir():
            if p.name != LOCK:
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def read_metrics(self) -> dict:
        return read_json(self.path / METRICS)

    def read_loglik_per_point(self) -> np.ndarray:
        return np.load(self.path / PER_POINT)


def check_run_dir(path: str | os.PathLike) -> Path:
    """The path, if it holds a run (config.json, run.json and model.pt); else a PyroVAEError."""
    path = Path(path)
    if not path.is_dir():
        raise PyroVAEError(f"run directory {path} does not exist")
    missing = [name for name in (CONFIG, INFO, WEIGHTS) if not (path / name).is_file()]
    if missing:
        raise PyroVAEError(f"{path} is not a pyro-vae run directory (no {', '.join(missing)})")
    return path


def prior_for(config: Config, prior, path) -> Any:
    """The prior to rebuild a run with: the object given, or the config's name. A run trained with a
    prior given as an object that has no importable name needs that object again."""
    if prior is None and config.prior == OBJECT_PRIOR:
        raise PyroVAEError(f"{path} was trained with a prior given as a Python object: pass it again as prior=")
    return prior


class Run:
    """A trained model with everything its run directory holds."""

    def __init__(self, path: Path, config: Config, vae: Any, info: dict, history: list | None = None, data=None):
        self.path, self.config, self.vae, self.info = Path(path), config, vae, info
        self._history, self._data = history, data

    @property
    def history(self) -> list:
        """history.json, read when first asked for (sampling does not need it)."""
        if self._history is None:
            self._history = self.files.read_history()
        return self._history

    def dataset(self):
        """The run's dataset (loaded once)."""
        if self._data is None:
            from .data import load_dataset

            self._data = load_dataset(self.config.dataset, self.config.data_root)
        return self._data

    def split(self, name: str = "test") -> tuple[torch.Tensor, torch.Tensor | None]:
        """A split's images exactly as training saw them held out (:meth:`Dataset.as_seen`: fixed
        binarization under ``--binarize``), on the model's device, and its labels (or None)."""
        x, y = self.dataset().as_seen(name, self.config.binarize)
        return x.to(self.vae.device), y

    @property
    def files(self) -> RunFiles:
        return RunFiles(self.path)

    @property
    def figures(self) -> Path:
        return self.path / FIGURES

    history_problem: str | None = None
    """What is wrong with history.json (truncated, mistyped), found when the run was opened; None if nothing."""

    def status_warning(self) -> str | None:
        """A line saying the weights are not those of a finished run, or what is wrong with its history.json;
        None if it finished and its files agree."""
        status = self.info.get("status")
        if status == "finished":
            return self.history_problem
        best = self.info.get("best_epoch")
        what = "being trained right now" if self.files.being_trained() is True else f"marked {status!r}"
        if status == "running" and what != "being trained right now":
            what += " (its training was killed, or is running elsewhere)"
        return f"{self.path} is {what}: these are the best weights so far (epoch {best}), not a finished run's"


def load_run(path: str | os.PathLike, prior=None, device: str | None = None, *, trust: bool = False,
             data=None) -> Run:
    """Rebuild the trained model of a run directory (its best weights), ready to evaluate.

    A run directory is untrusted input: config.json and run.json are checked against their formats,
    and a prior it names as ``module:attribute`` is imported (which runs that module's code) only with
    ``trust=True``, or not at all when ``prior`` (the object itself) is given. ``data``: the run's
    dataset, if already loaded."""
    from .models.priors import UntrustedPrior
    from .models.vae import build_vae

    files = RunFiles(check_run_dir(path))
    files.clean_temporary()
    config = files.read_config()
    dim, shape, binary = files.read_data_shape()
    try:  # sampling does not need the history: a broken one is said (Run.status_warning), not fatal
        files.check_history(files.read_info())
        history_problem = None
    except PyroVAEError as e:
        history_problem = str(e)
    try:
        vae = build_vae(config, dim, shape, binary, prior=prior_for(config, prior, files.path), trust_prior=trust)
    except UntrustedPrior as e:
        raise PyroVAEError(f"{files.path} was trained with a prior of its own: {e}") from None
    try:
        vae.load_state_dict(files.load_weights())
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e)[:100])
        raise PyroVAEError(f"{files / WEIGHTS} does not fit the model config.json describes ({first[:150]})") from None
    vae.to(device or "cpu").eval()
    run = Run(path=files.path, config=config, vae=vae, info=files.read_info(), data=data)
    run.history_problem = history_problem
    return run
