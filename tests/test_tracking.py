"""Per-epoch metrics to CSV, TensorBoard and MLflow through their own libraries, and progress that suits
where it is written."""

import csv
import json

import pytest

from pyro_vae import resume, train

from conftest import tiny_config


def test_csv_has_one_row_per_epoch(digits, tmp_path):
    run = train(tiny_config(epochs=3, log="csv"), tmp_path / "r", data=digits, progress=False)
    rows = list(csv.DictReader((run.path / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [float(r["valid_elbo"]) for r in rows] == pytest.approx([r["valid_elbo"] for r in run.history])


def test_tensorboard_scalars(digits, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(tiny_config(epochs=2, log="tensorboard"), tmp_path / "r", data=digits, progress=False)
    events = EventAccumulator(str(run.path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("valid_elbo")
    assert [e.step for e in scalars] == [1, 2]
    assert [e.value for e in scalars] == pytest.approx([r["valid_elbo"] for r in run.history])


def test_mlflow_run_is_continued_on_resume(digits, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def interrupt(epoch, record):
        if epoch == 2:
            raise KeyboardInterrupt

    cfg = tiny_config(epochs=3, log="mlflow")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "r", data=digits, progress=False, on_epoch_end=interrupt)
    run = resume(tmp_path / "r", data=digits, progress=False)
    run_id = json.loads((tmp_path / "r" / "run.json").read_text())["mlflow_run_id"]
    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "r" / "mlruns").resolve().as_uri())
    history = client.get_metric_history(run_id, "valid_elbo")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert client.get_run(run_id).data.params["latent_dim"] == "2"
    assert client.get_run(run_id).info.status == "FINISHED" and run.info["status"] == "finished"


def test_progress_off_a_terminal_is_one_line_per_epoch(digits, tmp_path, capsys):
    train(tiny_config(epochs=3), tmp_path / "r", data=digits, progress=True)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("epoch ")]
    assert [ln.split(":")[0] for ln in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert "\r" not in err and "validation ELBO" in lines[0]
