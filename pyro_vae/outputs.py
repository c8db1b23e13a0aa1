"""Where results go, checked before the work that makes them: a command never computes for minutes
and then loses everything to a path it cannot write."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import PyroVAEError


def _writable_ancestor(path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``path`` must be a directory we may create things in."""
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise PyroVAEError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PyroVAEError(f"{flag} {path}: {parent} is not writable")


def check_output_dir(path: str | os.PathLike, flag: str = "--out", empty: bool = False) -> Path:
    """A directory results will be written into: not a file, not under a file, writable (and empty if
    ``empty``). Nothing is created."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise PyroVAEError(f"{flag} {path} is a file, not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise PyroVAEError(f"{flag} {path} is not writable")
        if empty and any(path.iterdir()):
            raise PyroVAEError(f"{flag} {path} is not empty")
        return path
    _writable_ancestor(path, flag)
    return path


RUN_FILES = ("config.json", "run.json", "history.json", "metrics.json", "model.pt", "checkpoint.pt",
             "loglik_per_point.npy", "idata.nc", "study.json", "report.md", "report.html")
"""Files a command reads back later: a run's, an analysis's and a study's. No output replaces one."""


def check_output_file(path: str | os.PathLike, flag: str = "--out", suffix: str | None = None) -> Path:
    """A file a result will be written to (replacing an older one): not a directory, not under a file,
    in a writable directory, and never one of the files a run, an analysis or a study is read back from
    (:data:`RUN_FILES`: ``sample RUN --out RUN/model.pt`` would leave a run that no longer opens);
    with ``suffix`` (".png"), a name that ends so. Nothing is created."""
    path = Path(path)
    if path.name in RUN_FILES or path.suffix in (".pt", ".npy", ".nc"):
        raise PyroVAEError(f"{flag} {path} would overwrite a file that pyro-vae reads back ({path.name}); "
                           "choose another name")
    if path.is_dir():
        raise PyroVAEError(f"{flag} {path} is a directory; give the path of the file to write")
    if suffix is not None and path.suffix.lower() != suffix:
        raise PyroVAEError(f"{flag} {path}: the output is a {suffix.lstrip('.').upper()} image; give a name ending "
                           f"in {suffix}")
    if path.parent.exists():
        if not path.parent.is_dir():
            raise PyroVAEError(f"{flag} {path}: {path.parent} is a file, not a directory")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise PyroVAEError(f"{flag} {path}: {path.parent} is not writable")
        return path
    _writable_ancestor(path, flag)
    return path
