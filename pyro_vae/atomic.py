"""Files written whole or not at all, and written in the background while training goes on.

    atomic_path(path)          a temporary name beside ``path``, synced and renamed into place on success,
                               removed on failure: readers never see half a file
    atomic_write_bytes / _json / atomic_torch_save   the same for bytes, JSON, torch.save
    BackgroundWrites           batches of such files written by a worker thread, one batch at a time
    detached_copy(obj)         a snapshot of tensors that later in-place updates do not reach
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

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
    atomic_write_bytes(path, json_bytes(obj))


def atomic_torch_save(path, obj: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def detached_copy(obj: Any) -> Any:
    """``obj`` with every tensor replaced by a detached copy and every dict, list and tuple rebuilt: a
    snapshot that later in-place updates (an optimizer step) do not reach."""
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return type(obj)((k, detached_copy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(detached_copy(v) for v in obj)
    return obj


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM caught and held while the block runs, then raised again (as the handlers they
    found would have taken them). Python runs signal handlers in its main thread between bytecodes,
    whichever thread the signal reached, so blocking signals cannot keep a KeyboardInterrupt out of a
    block: replacing the handlers can. Elsewhere than the main thread no handler runs, so nothing is held."""
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in signals}
    if threading.current_thread() is not threading.main_thread() or None in previous.values():
        yield
        return
    caught: list[int] = []
    try:
        for s in signals:  # inside the try: a signal between two of these still finds every handler restored
            signal.signal(s, lambda signum, frame: caught.append(signum))
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in caught:
            signal.raise_signal(s)


class BackgroundWrites:
    """Files written by a worker thread, one batch at a time, in the order given, each atomically
    (:func:`atomic_path`): ``submit([(path, bytes or object for torch.save), ...], then)`` first waits for
    the batch before it, so at most one is in flight; ``wait()`` blocks until it is written, then calls its
    ``then()`` in the caller's thread (what the caller records as written, e.g. the epoch in run.json's
    dict), or raises its error if it had one (a full disk) and drops ``then``.

    Why: on this project's 2-core CPU serialising and fsyncing an epoch's checkpoint took 25-50 ms in
    the training thread (1-1.5% of a 50,000-image epoch, more on a GPU); here the training thread only
    copies the tensors (:func:`detached_copy`) and the next epoch trains while they are written."""

    def __init__(self):
        self._done: threading.Event | None = None  # set by the worker when its batch is written (or failed)
        self._error: BaseException | None = None
        self._then = None

    def submit(self, files: list[tuple[Path, Any]], then=None) -> None:
        self.wait()
        done = threading.Event()
        thread = threading.Thread(target=self._write, args=(files, done), name="pyro-vae-writes")
        with _signals_held():  # Ctrl-C or SIGTERM inside Thread.start() could leave a thread that writes unwatched
            thread.start()
            self._done, self._then = done, then

    def _write(self, files, done: threading.Event) -> None:
        try:
            for path, content in files:
                if isinstance(content, bytes):
                    atomic_write_bytes(path, content)
                else:
                    atomic_torch_save(path, content)
        except BaseException as e:  # raised again by wait(), in the training thread
            self._error = e
        finally:
            done.set()

    def wait(self) -> None:
        # an Event rather than Thread.join(): Python 3.11's join, interrupted by Ctrl-C, can mark a thread
        # that is still writing as finished, and a later run.json would then be overwritten by the worker's
        if self._done is not None:
            self._done.wait()
            self._done = None
        then, self._then = self._then, None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if then is not None:
            then()


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
