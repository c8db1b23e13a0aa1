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
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config
from .errors import PyroVAEError

CONFIG, INFO, HISTORY, WEIGHTS, CHECKPOINT, FIGURES = (
    "config.json", "run.json", "history.json", "model.pt", "checkpoint.pt", "figures",
)
METRICS, PER_POINT = "metrics.json", "loglik_per_point.npy"
OBJECT_PRIOR = "<object>"  # config.json's name for a prior given as an object that cannot be imported by name


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary file name beside ``path``; on success it is synced and renamed to ``path``,
    on failure removed: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_json(path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(path, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_json(path) -> Any:
    return json.loads(Path(path).read_text())


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


class RunFiles:
    """The files of one run directory, read and written in their formats (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # config.json
    def write_config(self, config: Config) -> None:
        atomic_write_json(self.path / CONFIG, config.to_dict())

    def read_config(self) -> Config:
        try:
            return Config.from_json((self.path / CONFIG).read_text())
        except (ValueError, TypeError) as e:
            raise PyroVAEError(f"{self.path / CONFIG} is unreadable ({e})") from None

    # run.json
    def read_info(self) -> dict:
        return read_json(self.path / INFO) if (self.path / INFO).is_file() else {}

    def set_status(self, info: dict, status: str, **fields) -> dict:
        """Update ``info`` with the status and fields, and write it as run.json."""
        info.update(status=status, **fields)
        atomic_write_json(self.path / INFO, info)
        return info

    # history.json
    def write_history(self, history: list) -> None:
        atomic_write_json(self.path / HISTORY, history)

    def read_history(self) -> list:
        return read_json(self.path / HISTORY) if (self.path / HISTORY).is_file() else []

    # model.pt and checkpoint.pt
    def save_weights(self, state_dict: dict) -> None:
        atomic_torch_save(self.path / WEIGHTS, state_dict)

    def load_weights(self) -> dict:
        return torch.load(self.path / WEIGHTS, map_location="cpu", weights_only=True)

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        atomic_torch_save(self.path / CHECKPOINT, asdict(checkpoint))

    def load_checkpoint(self, device: torch.device | str = "cpu") -> Checkpoint:
        state = torch.load(self.path / CHECKPOINT, map_location=device, weights_only=True)
        state["rng"] = {k: (v.cpu() if v is not None else None) for k, v in state["rng"].items()}  # RNG states live on the CPU
        return Checkpoint(**state)

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
        return (self.path / METRICS).is_file()

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


@dataclass
class Run:
    """A trained model with everything its run directory holds."""

    path: Path
    config: Config
    vae: Any
    info: dict
    history: list = field(default_factory=list)
    _data: Any = field(default=None, repr=False)

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


def load_run(path: str | os.PathLike, prior=None, device: str | None = None, *, data=None) -> Run:
    """Rebuild the trained model of a run directory (its best weights), ready to evaluate.

    ``prior``: the prior object, for runs trained with a prior given as a Python object.
    ``data``: the run's dataset, if already loaded."""
    from .models.vae import build_vae

    files = RunFiles(check_run_dir(path))
    config = files.read_config()
    try:
        data_info = files.read_info()["data"]
        shape = (data_info["dim"], data_info["image_shape"], data_info["binary"])
    except (ValueError, KeyError, TypeError) as e:
        raise PyroVAEError(f"{files.path}: config.json or run.json is unreadable ({e})") from None
    vae = build_vae(config, *shape, prior=prior_for(config, prior, files.path))
    vae.load_state_dict(files.load_weights())
    vae.to(device or "cpu").eval()
    return Run(path=files.path, config=config, vae=vae, info=files.read_info(), history=files.read_history(),
               _data=data)
