"""The run directory: everything that reads a trained model starts here.

    config.json     the Config, enough to rebuild the model
    run.json        status (running / finished / interrupted / diverged / failed), data shape, best epoch,
                    test ELBO, which ELBO trained it (elbo, compiled, not_compiled_because)
    history.json    one record per epoch
    model.pt        the best weights so far (by validation ELBO)
    checkpoint.pt   the state at the end of the last finished epoch, for --resume
    figures/        samples, reconstructions, learning curves, latent space

Every file is written to a temporary name and renamed into place, so a file that exists is complete.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import Config
from .errors import PyroVAEError

CONFIG, INFO, HISTORY, WEIGHTS, CHECKPOINT, FIGURES = (
    "config.json", "run.json", "history.json", "model.pt", "checkpoint.pt", "figures",
)


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


def check_run_dir(path: str | os.PathLike) -> Path:
    """The path, if it holds a run (config.json, run.json and model.pt); else a PyroVAEError."""
    path = Path(path)
    if not path.is_dir():
        raise PyroVAEError(f"run directory {path} does not exist")
    missing = [name for name in (CONFIG, INFO, WEIGHTS) if not (path / name).is_file()]
    if missing:
        raise PyroVAEError(f"{path} is not a pyro-vae run directory (no {', '.join(missing)})")
    return path


@dataclass
class Run:
    """A trained model with everything its run directory holds."""

    path: Path
    config: Config
    vae: Any
    info: dict
    history: list = field(default_factory=list)

    def dataset(self):
        from .data import load_dataset

        return load_dataset(self.config.dataset, self.config.data_root)

    @property
    def figures(self) -> Path:
        return self.path / FIGURES


def load_run(path: str | os.PathLike, prior=None, device: str | None = None) -> Run:
    """Rebuild the trained model of a run directory (its best weights), ready to evaluate.

    ``prior``: the prior object, for runs trained with a prior given as a Python object."""
    from .models.vae import build_vae

    path = check_run_dir(path)
    try:
        config = Config.from_json((path / CONFIG).read_text())
        info = read_json(path / INFO)
        data = info["data"]
    except (ValueError, KeyError, TypeError) as e:
        raise PyroVAEError(f"{path}: config.json or run.json is unreadable ({e})") from None
    if prior is None and config.prior == "<object>":
        raise PyroVAEError(f"{path} was trained with a prior given as a Python object: pass it as load_run(..., prior=)")
    vae = build_vae(config, data["dim"], data["image_shape"], data["binary"], prior=prior)
    state = torch.load(path / WEIGHTS, map_location="cpu", weights_only=True)
    vae.load_state_dict(state)
    vae.to(device or "cpu").eval()
    history = read_json(path / HISTORY) if (path / HISTORY).is_file() else []
    return Run(path=path, config=config, vae=vae, info=info, history=history)
