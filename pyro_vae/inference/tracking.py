"""Where a run's per-epoch numbers go besides history.json: the progress display, and a tracker of your
choice through its own library (``--log``):

    csv           metrics.csv in the run directory (one row per epoch, rewritten atomically)
    tensorboard   the run directory's tensorboard/ (``torch.utils.tensorboard.SummaryWriter``; view it with
                  ``tensorboard --logdir RUN/tensorboard``); needs the ``tensorboard`` package
    mlflow        an MLflow run (``mlflow.log_params`` the config, ``mlflow.log_metrics`` each epoch) under
                  $MLFLOW_TRACKING_URI (a server, or a database with full ``mlflow``), or else MLflow's file
                  store in RUN/mlruns (``mlflow ui --backend-store-uri RUN/mlruns``; MLflow 3 keeps it behind
                  MLFLOW_ALLOW_FILE_STORE, set for that default); a resumed run continues its MLflow run
                  (its id is kept in run.json); needs ``mlflow`` or ``mlflow-skinny``

Both are in the ``pyro-vae[tracking]`` extra. The progress display is a bar on a terminal and one line per
epoch elsewhere (a log file, a CI job, a batch system), never a flood of carriage returns.
"""

from __future__ import annotations

import csv
import io
import os
import sys

from tqdm.auto import tqdm

from ..errors import PyroVAEError, first_line
from ..run_dir import RunFiles, atomic_write_bytes

TRACKERS = ("none", "csv", "tensorboard", "mlflow")

MLFLOW_NETWORK = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "20", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
"""MLflow's own request settings, where the environment does not set them: a tracking server that cannot be
reached fails within about a minute (20 s a request, one retry) instead of retrying for many minutes."""


def is_terminal(stream=None) -> bool:
    """Whether ``stream`` (default stderr, where tqdm writes) is a terminal: a bar's carriage returns and
    escape codes belong there, not in a log file."""
    stream = stream or sys.stderr
    return hasattr(stream, "isatty") and stream.isatty()


def bar(*args, enabled: bool = True, **kw):
    """A tqdm progress bar on a terminal, and none elsewhere (a log file gets no carriage returns); the
    long commands print a line per stage or epoch there instead."""
    return tqdm(*args, disable=not (enabled and is_terminal(kw.get("file"))), **kw)


class Progress:
    """A tqdm bar over steps on a terminal; elsewhere one printed line per epoch (or nothing)."""

    def __init__(self, enabled: bool, total_epochs: int, steps: int, start_epoch: int, name: str, stream=None):
        self.stream = stream or sys.stderr
        self.terminal = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.lines = enabled and not self.terminal
        self.total_epochs = total_epochs
        self.bar = tqdm(total=total_epochs * steps, initial=start_epoch * steps, disable=not self.terminal,
                        unit="step", desc=f"training {name}", dynamic_ncols=True, file=self.stream)

    def update(self) -> None:
        self.bar.update()

    def epoch(self, record: dict, best: float) -> None:
        self.bar.set_postfix(epoch=record["epoch"], valid_elbo=f"{record['valid_elbo']:.2f}", best=f"{best:.2f}")
        if self.lines:
            print(f"epoch {record['epoch']}/{self.total_epochs}: train loss {record['train_loss']:.3f}, validation "
                  f"ELBO {record['valid_elbo']:.3f} (best {best:.3f}), beta {record['beta']:.3g}, "
                  f"{record['seconds']:.1f} s", file=self.stream, flush=True)

    def close(self) -> None:
        self.bar.close()


class Tracker:
    """One of :data:`TRACKERS` for a run; ``log(record)`` after each epoch, ``close()`` at the end."""

    def __init__(self, kind: str, files: RunFiles, config, info: dict):
        if kind not in TRACKERS:
            raise PyroVAEError(f"unknown --log {kind!r}; choose one of {', '.join(TRACKERS)}")
        self.kind, self.files, self.info = kind, files, info
        self._writer = self._mlflow = None
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise PyroVAEError("--log tensorboard needs the tensorboard package "
                                   "(pip install 'pyro-vae[tracking]')") from None
            done = info.get("epochs_completed", 0)
            self._writer = SummaryWriter(log_dir=str(files.path / "tensorboard"), purge_step=done + 1 if done else None)
        elif kind == "mlflow":
            try:
                import mlflow
            except ImportError:
                raise PyroVAEError("--log mlflow needs mlflow or mlflow-skinny (pip install 'pyro-vae[tracking]')") \
                    from None
            uri = os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:  # a local default: MLflow's file store, which MLflow 3
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # keeps behind this opt-in
            # set each time: MLflow keeps the last URI set in the process, which would outlive the run it was for
            mlflow.set_tracking_uri(uri or (files.path / "mlruns").resolve().as_uri())
            for name, value in MLFLOW_NETWORK.items():  # a server that cannot be reached fails, it does not hang
                os.environ.setdefault(name, value)
            try:
                run = mlflow.start_run(run_id=info.get("mlflow_run_id"), run_name=files.path.name)
                if "mlflow_run_id" not in info:
                    info["mlflow_run_id"] = run.info.run_id
                    mlflow.log_params({k: str(v) for k, v in config.to_dict().items()})
            except Exception as e:
                first = first_line(e)
                raise PyroVAEError(f"--log mlflow: the tracking store {uri or files.path / 'mlruns'} failed "
                                   f"({type(e).__name__}: {first}); check MLFLOW_TRACKING_URI") from None
            self._mlflow = mlflow

    def log(self, history: list[dict]) -> None:
        record = history[-1]
        numbers = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "epoch"}
        if self.kind == "csv":
            keys = list(dict.fromkeys(k for r in history for k in r))
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)
            atomic_write_bytes(self.files.path / "metrics.csv", buffer.getvalue().encode())
        elif self._writer is not None:
            for key, value in numbers.items():
                self._writer.add_scalar(key, value, record["epoch"])
            self._writer.flush()
        elif self._mlflow is not None:
            self._mlflow.log_metrics(numbers, step=record["epoch"])

    def close(self, status: str = "FINISHED") -> None:
        if self._writer is not None:
            self._writer.close()
        if self._mlflow is not None:
            self._mlflow.end_run(status="FINISHED" if status == "finished" else "KILLED" if status == "interrupted"
                                 else "FAILED")


__all__ = ["Progress", "Tracker", "TRACKERS"]
