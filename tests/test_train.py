"""Training by SVI: the ELBO rises, checkpoints round-trip, interrupted runs resume, NaN stops cleanly."""

import importlib
import json

import pytest
import torch

from pyro_vae import TrainingDiverged, evaluate_elbo, load_run, resume, train
from pyro_vae.errors import PyroVAEError

from conftest import tiny_config


def test_validation_elbo_rises_during_training(digits, tmp_path):
    run = train(tiny_config(epochs=6), tmp_path / "run", data=digits, progress=False)
    elbos = [r["valid_elbo"] for r in run.history]
    assert len(elbos) == 6
    assert elbos[-1] > elbos[0] + 5.0
    assert run.info["status"] == "finished"
    for name in ("samples", "reconstructions", "learning_curves", "latent_space"):
        assert (run.path / "figures" / f"{name}.png").stat().st_size > 1000


def test_checkpoint_round_trip_gives_the_same_test_elbo(digits, tmp_path):
    cfg = tiny_config(epochs=3)
    run = train(cfg, tmp_path / "run", data=digits, progress=False)
    reloaded = load_run(tmp_path / "run")
    assert reloaded.config == cfg
    for key, value in run.vae.state_dict().items():
        assert torch.equal(value, reloaded.vae.state_dict()[key]), key
    from pyro_vae.inference.train import EVAL_SEED_OFFSET

    again = evaluate_elbo(reloaded.vae, digits.test, seed=cfg.seed + 2 * EVAL_SEED_OFFSET)
    assert again == pytest.approx(run.info["test_elbo"], abs=1e-4)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["test_elbo"] == run.info["test_elbo"]


def test_best_checkpoint_is_the_best_epoch(digits, tmp_path):
    run = train(tiny_config(epochs=5), tmp_path / "run", data=digits, progress=False)
    best = max(run.history, key=lambda r: r["valid_elbo"])
    assert run.info["best_epoch"] == best["epoch"]
    from pyro_vae.inference.train import EVAL_SEED_OFFSET

    assert evaluate_elbo(run.vae, digits.valid, seed=EVAL_SEED_OFFSET) == pytest.approx(best["valid_elbo"], abs=1e-4)


def test_interrupted_run_resumes_to_the_same_result(digits, tmp_path):
    cfg = tiny_config(epochs=4)
    straight = train(cfg, tmp_path / "straight", data=digits, progress=False)

    def interrupt(epoch, record):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", data=digits, progress=False, on_epoch_end=interrupt)
    info = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert info["status"] == "interrupted" and info["epochs_completed"] == 2
    assert load_run(tmp_path / "cut").vae is not None  # the last good checkpoint is loadable

    resumed = resume(tmp_path / "cut", data=digits, progress=False)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    for a, b in zip(straight.history, resumed.history):
        assert a["valid_elbo"] == pytest.approx(b["valid_elbo"], abs=1e-4)
    assert resumed.info["test_elbo"] == pytest.approx(straight.info["test_elbo"], abs=1e-4)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(digits, tmp_path, monkeypatch):
    train_module = importlib.import_module("pyro_vae.inference.train")
    build_vae, built = train_module.build_vae, []

    def build_and_keep(*args, **kwargs):
        built.append(build_vae(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(train_module, "build_vae", build_and_keep)

    def poison(epoch, record):
        if epoch == 2:  # a weight turns NaN, as after an exploding step
            with torch.no_grad():
                next(built[0].decoder.parameters()).fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="epoch 3"):
        train(tiny_config(epochs=5), tmp_path / "run", data=digits, progress=False, on_epoch_end=poison)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "diverged"
    kept = load_run(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in kept.vae.parameters())
    assert info["best_epoch"] in (1, 2)


@pytest.mark.parametrize("objective,particles", [("analytic", 1), ("iwae", 4), ("trace", 3)])
def test_each_objective_trains(objective, particles, digits, tmp_path):
    run = train(tiny_config(epochs=2, objective=objective, num_particles=particles), tmp_path / "run",
                data=digits, progress=False)
    assert run.history[-1]["valid_elbo"] > run.history[0]["valid_elbo"]


def test_kl_warmup_and_beta_zero(digits, tmp_path):
    run = train(tiny_config(epochs=4, warmup_epochs=4, beta=2.0), tmp_path / "warm", data=digits, progress=False)
    betas = [r["beta"] for r in run.history]
    assert betas == sorted(betas) and betas[0] > 0 and betas[-1] < 2.0
    ae = train(tiny_config(epochs=2, beta=0.0), tmp_path / "ae", data=digits, progress=False)
    assert all(r["beta"] == 0.0 for r in ae.history)
    assert torch.isfinite(torch.tensor(ae.info["test_elbo"]))


def test_existing_run_directory_is_not_overwritten(digits, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("keep me")
    with pytest.raises(PyroVAEError, match="already exists"):
        train(tiny_config(), tmp_path / "run", data=digits, progress=False)
    assert (tmp_path / "run" / "precious.txt").read_text() == "keep me"


def test_dynamic_binarization_trains_a_bernoulli_vae(digits, tmp_path):
    run = train(tiny_config(epochs=2, binarize=True), tmp_path / "run", data=digits, progress=False)
    assert run.vae.likelihood.__class__.__name__ == "Bernoulli"
    assert run.history[-1]["valid_elbo"] > run.history[0]["valid_elbo"]


def test_beta_runs_keep_the_checkpoint_best_by_their_own_objective(digits, tmp_path):
    """With beta != 1 the model is trained for E log p(x|z) - beta KL, and selected by it too."""
    run = train(tiny_config(epochs=4, beta=0.0), tmp_path / "ae", data=digits, progress=False)
    scores = [r["valid_beta_elbo"] for r in run.history]
    assert run.info["best_epoch"] == 1 + scores.index(max(scores))
    assert run.info["selected_by"].startswith("validation beta-ELBO")
    assert run.info["best_valid_elbo"] == run.history[run.info["best_epoch"] - 1]["valid_elbo"]


def test_the_direct_elbo_trains_like_pyros(digits, tmp_path):
    """Training computes the ELBO directly by default; --elbo pyro runs Pyro's, compiled with torch.jit or (with
    --no-jit) in Python: the same estimator on the same noise, so the same training path up to rounding, with
    and without a KL warm-up."""
    for name, extra in (("plain", {}), ("warm", {"warmup_epochs": 2.0})):
        runs = {elbo: train(tiny_config(epochs=2, **cfg, **extra), tmp_path / f"{name}-{elbo}", data=digits,
                            progress=False)
                for elbo, cfg in (("DirectELBO", {}), ("JitTrace_ELBO", {"elbo": "pyro"}),
                                  ("Trace_ELBO", {"elbo": "pyro", "jit": False}))}
        direct = runs["DirectELBO"]
        assert [run.info["elbo"] for run in runs.values()] == list(runs)
        assert direct.history[-1]["valid_elbo"] > direct.history[0]["valid_elbo"]
        for run in runs.values():
            assert [r["beta"] for r in run.history] == [r["beta"] for r in direct.history]
            for a, b in zip(run.history, direct.history):
                assert a["train_loss"] == pytest.approx(b["train_loss"], abs=0.05)
                assert a["valid_elbo"] == pytest.approx(b["valid_elbo"], abs=0.05)


def test_an_unexpected_error_marks_the_run_failed_and_resume_can_drop_the_jit(digits, tmp_path):
    def crash(epoch, record):
        if epoch == 1:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        train(tiny_config(epochs=2, elbo="pyro"), tmp_path / "run", data=digits, progress=False, on_epoch_end=crash)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "failed" and "disk on fire" in info["error"]
    assert info["elbo"] == "JitTrace_ELBO" and info["epochs_completed"] == 1
    resumed = resume(tmp_path / "run", data=digits, jit=False, progress=False)
    assert resumed.info["status"] == "finished" and resumed.info["elbo"] == "Trace_ELBO"
    assert "--no-jit" in resumed.info["not_compiled_because"]
    assert [r["epoch"] for r in resumed.history] == [1, 2]
