"""Outgrowing one machine: a study's runs as Ray tasks (here a local Ray with 2 CPUs), and one run
data-parallel across processes with Lightning Fabric (here 2 CPU processes over gloo)."""

import json

import numpy as np
import pytest

from pyro_vae.cli import main

TINY = ["--epochs", "1", "--hidden-dim", "16", "--hidden-layers", "1", "--k", "5", "--quiet", "--cpus-per-run", "1"]


def _metrics(study):
    return {p.name: json.loads((p / "metrics.json").read_text()) for p in sorted((study / "runs").iterdir())}


def test_a_ray_study_equals_the_local_one_and_survives_a_failed_task(tmp_path, capsys):
    pytest.importorskip("ray")
    args = ["compare", "--priors", "normal,laplace", "--latent-dims", "2", *TINY]
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    assert main([*args, "--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    local, ray = _metrics(tmp_path / "local"), _metrics(tmp_path / "ray")
    assert set(local) == set(ray) == {"normal-z2-s0", "laplace-z2-s0"}
    for name in local:  # seeds make runs deterministic: the same numbers, not close ones
        for key in ("log_likelihood", "elbo", "rate", "distortion"):
            assert local[name][key] == ray[name][key], (name, key)
        a = np.load(tmp_path / "local" / "runs" / name / "loglik_per_point.npy")
        b = np.load(tmp_path / "ray" / "runs" / name / "loglik_per_point.npy")
        assert np.array_equal(a, b)
    # a planted failure: one setting's run directory is blocked by a file; that task fails, the other finishes
    study = tmp_path / "mixed"
    (study / "runs").mkdir(parents=True)
    (study / "runs" / "laplace-z2-s0").write_text("a file where the run's directory should be")
    assert main([*args, "--out", str(study), "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert "1 of 2 runs failed" in err and "laplace-z2-s0" in err
    finished = json.loads((study / "runs" / "normal-z2-s0" / "metrics.json").read_text())
    assert finished["log_likelihood"] == local["normal-z2-s0"]["log_likelihood"]
    report = (study / "report.md").read_text()
    assert "## Runs that failed" in report and "laplace-z2-s0" in report


def test_ray_refuses_a_study_directory_its_workers_cannot_write(tmp_path, capsys, monkeypatch):
    pytest.importorskip("ray")
    import pyro_vae.study.executors as executors

    monkeypatch.setattr(executors, "_probe", lambda out: "PermissionError: read-only file system")
    assert main(["compare", "--priors", "normal", "--latent-dims", "2", *TINY, "--out", str(tmp_path / "s"),
                 "--executor", "ray"]) == 2
    assert "cannot write to the study directory" in capsys.readouterr().err


def _reference(cfg, data, epochs, world=2):
    """One process doing what `world` data-parallel processes do: each global batch in `world` shards, each
    shard's Monte Carlo noise from its rank's stream, the gradients averaged, one Adam step."""
    import pyro
    import torch

    from pyro_vae import build_vae
    from pyro_vae.inference.distributed import ELBOLoss, epoch_order, shard
    from pyro_vae.inference.objectives import KLWeight

    torch.manual_seed(cfg.seed)
    pyro.set_rng_seed(cfg.seed)
    vae = build_vae(cfg, data.dim, data.image_shape, data.binary)
    loss = ELBOLoss(vae, cfg, KLWeight(1.0), scale=float(world))
    optim = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    streams = []
    for r in range(world):
        torch.manual_seed(cfg.seed + 1 + r)
        streams.append(torch.get_rng_state())
    x, bs = data.train, cfg.batch_size
    for epoch in range(epochs):
        order = epoch_order(len(x), cfg.seed, epoch)
        for i in range(-(-len(x) // bs)):
            batch = x[order[i * bs : (i + 1) * bs]]
            for r in range(world):
                torch.set_rng_state(streams[r])
                loss(shard(batch, r, world)).backward()
                streams[r] = torch.get_rng_state()
            for p in vae.parameters():
                p.grad /= world
            optim.step()
            optim.zero_grad(set_to_none=True)
    return vae


def test_fabric_two_processes_train_as_one_on_the_same_global_batches(digits, tmp_path):
    pytest.importorskip("lightning_fabric")
    import torch

    from conftest import tiny_config
    from pyro_vae import load_run
    from pyro_vae.inference.distributed import train_distributed

    cfg = tiny_config(epochs=1, clip_norm=0.0, batch_size=100)
    run = train_distributed(cfg, tmp_path / "ddp", devices=2, strategy="ddp_spawn", data=digits, progress=False)
    assert run.info["status"] == "finished" and run.info["devices"] == 2 and run.info["elbo"] == "Trace_ELBO"
    assert len(json.loads((tmp_path / "ddp" / "history.json").read_text())) == 1
    assert not list((tmp_path / "ddp").glob(".*.tmp"))
    reference = _reference(cfg, digits, epochs=1)
    reloaded = load_run(tmp_path / "ddp").vae
    for (name, a), b in zip(reference.state_dict().items(), reloaded.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    # resumed for one more epoch on the same processes: as if trained for two epochs straight
    import dataclasses

    more = dataclasses.replace(cfg, epochs=2)
    train_distributed(more, tmp_path / "ddp", devices=2, strategy="ddp_spawn", data=digits, resume=True,
                      progress=False)
    assert len(json.loads((tmp_path / "ddp" / "history.json").read_text())) == 2
    last = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["model"]
    for (name, a), b in zip(_reference(more, digits, epochs=2).state_dict().items(), last.values()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_train_devices_from_the_command_line(tmp_path):
    """pyro-vae train --devices 2: Fabric's launcher runs the same command again for rank 1; rank 0 alone
    writes the run and prints it."""
    pytest.importorskip("lightning_fabric")
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pyro_vae.cli", "train", "--devices", "2", "--epochs", "1",
                           "--hidden-dim", "16", "--hidden-layers", "1", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("run directory:") == 1 and "2 processes" in proc.stdout
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["devices"] == 2 and not info["compiled"]
