"""Untrusted run directories, corrupt files, out-of-range input, unwritable outputs and early faults:
each one clear line and exit status 2 (130 for an interrupt), no code run that a file names, nothing
lost, no dead end. Every file here is written by the test itself."""

import gzip
import json
import math
import shutil
import struct

import numpy as np
import pytest
import torch
from scipy.io import savemat

from pyro_vae import PyroVAEError, TrainingDiverged, load_run, resume, train
from pyro_vae.cli import main
from pyro_vae.data import load_dataset, read_binarized_mnist, read_idx

from conftest import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    train(tiny_config(epochs=2), out, progress=False)
    return out


@pytest.fixture
def run_copy(trained, tmp_path):
    """A private copy of the trained run, to break."""
    return shutil.copytree(trained, tmp_path / "run")


def one_line_error(capsys, code, expected_code=2) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == expected_code and len(err) == 1, (code, err)
    return err[0]


def _edit_json(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


# --------------------------------------------------------------------------- 1. opening a run runs no code


EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


@pytest.mark.parametrize("command", [["evaluate", "--k", "2", "--samples", "4", "--quiet"], ["sample"],
                                     ["reconstruct"], ["analyze", "--quiet"], ["train", "--resume"]])
def test_a_run_directory_never_imports_the_module_it_names(command, run_copy, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "marker"
    module = f"evil_{command[0]}"
    (tmp_path / f"{module}.py").write_text(EVIL.format(marker=str(marker)))
    monkeypatch.chdir(tmp_path)  # where `--prior my_priors:cauchy` looks for its module
    _edit_json(run_copy / "config.json", prior=f"{module}:no_such_attribute")
    args = [command[0], *command[1:], str(run_copy)] if command[0] == "train" else [command[0], str(run_copy),
                                                                                    *command[1:]]
    line = one_line_error(capsys, main(args))
    assert module in line and "--trust-prior" in line
    assert not marker.exists()


@pytest.mark.parametrize("prior,latent_dim", [("os:system", "touch {marker}"), ("builtins:exec", 2),
                                              ("os:system", 2)])
def test_a_config_that_names_a_function_to_call_is_refused(prior, latent_dim, run_copy, tmp_path, capsys):
    marker = tmp_path / "marker"
    if isinstance(latent_dim, str):
        latent_dim = latent_dim.format(marker=marker)
    _edit_json(run_copy / "config.json", prior=prior, latent_dim=latent_dim)
    line = one_line_error(capsys, main(["evaluate", str(run_copy), "--quiet"]))
    assert "config.json" in line or "--trust-prior" in line
    assert not marker.exists()
    with pytest.raises(PyroVAEError):
        load_run(run_copy)


def test_trust_is_asked_for_once_per_call(run_copy, tmp_path, monkeypatch, capsys):
    """With --trust-prior the module is imported (and a missing attribute is one line)."""
    marker = tmp_path / "marker"
    (tmp_path / "trusted_mod.py").write_text(EVIL.format(marker=str(marker)))
    monkeypatch.chdir(tmp_path)
    _edit_json(run_copy / "config.json", prior="trusted_mod:nothing")
    line = one_line_error(capsys, main(["sample", str(run_copy), "--trust-prior"]))
    assert marker.exists() and "cannot import prior" in line


def test_a_config_file_for_training_needs_trust_for_its_module_prior(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"prior": "os:system", "epochs": 1}))
    line = one_line_error(capsys, main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"), "--quiet"]))
    assert "--trust-prior" in line and not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- 2. corrupt or mismatched files


@pytest.mark.parametrize("damage,words", [
    (lambda run: (run / "model.pt").write_bytes((run / "model.pt").read_bytes()[:200]), "model.pt"),
    (lambda run: (run / "model.pt").write_bytes(b"garbage" * 50), "model.pt"),
    (lambda run: _edit_json(run / "config.json", latent_dim=5), "does not fit the model"),
    (lambda run: _edit_json(run / "config.json", hidden_dim="wide"), "hidden_dim must be an integer"),
    (lambda run: (run / "config.json").write_text("{not json"), "config.json"),
    (lambda run: (run / "run.json").write_text("[1, 2"), "run.json"),
    (lambda run: _edit_json(run / "run.json", data={"dim": "many"}), "run.json"),
], ids=["truncated-weights", "garbage-weights", "other-latent-size", "typed-config", "bad-config", "bad-run-json",
        "bad-data-record"])
def test_corrupt_run_files_are_one_line(damage, words, run_copy, capsys):
    damage(run_copy)
    for command in (["sample", str(run_copy)], ["evaluate", str(run_copy), "--quiet"]):
        assert words in one_line_error(capsys, main(command))


def test_sampling_does_not_need_the_history(run_copy, capsys):
    (run_copy / "history.json").write_text("{broken")
    assert main(["sample", str(run_copy), "--n", "4"]) == 0
    with pytest.raises(PyroVAEError, match="history.json"):
        load_run(run_copy).history


def test_corrupt_data_files_are_one_line(tmp_path):
    good = (np.random.RandomState(0).rand(3, 784) < 0.2).astype(np.uint8)
    savemat(tmp_path / "ok.mat", {"X": good})
    (tmp_path / "cut.mat").write_bytes((tmp_path / "ok.mat").read_bytes()[:300])
    (tmp_path / "junk.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\x00\xff" * 100)
    for name in ("cut.mat", "junk.mat"):
        with pytest.raises(PyroVAEError, match=name):
            read_binarized_mnist(tmp_path / name)
    (tmp_path / "rows.amat").write_text(" ".join(["1"] * 784) + "\n" + " ".join(["0"] * 783) + "\n"
                                        + " ".join(["1"] * 785) + "\n")
    with pytest.raises(PyroVAEError, match="unequal length"):
        read_binarized_mnist(tmp_path / "rows.amat")
    (tmp_path / "glued.amat").write_text("10 " * 392 + "\n")
    with pytest.raises(PyroVAEError, match="other than 0 and 1"):
        read_binarized_mnist(tmp_path / "glued.amat")
    header = struct.pack(">BBBB", 0, 0, 0x08, 3) + struct.pack(">3I", 60000, 28, 28)
    with gzip.open(tmp_path / "cut-idx.gz", "wb") as f:
        f.write(header + bytes(1000))
    (tmp_path / "cut2-idx.gz").write_bytes((tmp_path / "cut-idx.gz").read_bytes()[:30])
    (tmp_path / "junk-idx.gz").write_bytes(b"\x1f\x8b" + b"junk" * 20)
    (tmp_path / "huge-idx").write_bytes(struct.pack(">BBBB", 0, 0, 0x08, 3) + struct.pack(">3I", 2**32 - 1, 2**32 - 1,
                                                                                        2**32 - 1) + bytes(10))
    (tmp_path / "short-header").write_bytes(struct.pack(">BBBB", 0, 0, 0x08, 200) + bytes(12))
    for name, words in [("cut-idx.gz", "different size"), ("cut2-idx.gz", "cannot be read"),
                        ("junk-idx.gz", "cannot be read"), ("huge-idx", "different size"),
                        ("short-header", "cut short")]:
        with pytest.raises(PyroVAEError, match=words):
            read_idx(tmp_path / name)


@pytest.mark.parametrize("array,words", [(np.array([["a", "b"], ["c", "d"]] * 3), "real numbers"),
                                         (np.ones((6, 4), dtype=complex), "real numbers"),
                                         (np.full((6, 4), np.nan), "NaN")])
def test_user_arrays_of_the_wrong_kind_are_refused(array, words, tmp_path):
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(PyroVAEError, match=words):
        load_dataset(str(tmp_path / "x.npy"))


def test_float_arrays_in_0_to_255_are_accepted(tmp_path):
    x = np.random.RandomState(0).randint(0, 256, size=(20, 4, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    data = load_dataset(str(tmp_path / "x.npy"))
    assert data.train.max() <= 1 and data.train.min() >= 0
    np.save(tmp_path / "y.npy", x + 0.5)  # neither [0, 1] nor whole numbers in 0..255
    with pytest.raises(PyroVAEError, match="whole numbers in 0..255"):
        load_dataset(str(tmp_path / "y.npy"))


def test_fashion_mnist_pixels_are_checked(tmp_path, monkeypatch):
    monkeypatch.setattr("pyro_vae.data.FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "nowhere"))
    images = np.full((12, 28, 28), np.nan, dtype=">f4")
    for stem, array in (("train-images-idx3-ubyte", images), ("t10k-images-idx3-ubyte", images[:4]),
                        ("train-labels-idx1-ubyte", np.zeros(12, np.uint8)),
                        ("t10k-labels-idx1-ubyte", np.zeros(4, np.uint8))):
        code = 0x0D if array.dtype.kind == "f" else 0x08
        header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
        (tmp_path / stem).write_bytes(header + array.tobytes())
    from pyro_vae.data import load_fashion_mnist

    with pytest.raises(PyroVAEError, match="NaN"):
        load_fashion_mnist(tmp_path)


# --------------------------------------------------------------------------- 3. input ranges, before any work


@pytest.mark.parametrize("args,words", [
    (["--beta", "inf"], "beta must be a finite number"), (["--lr", "inf"], "lr must be a finite number"),
    (["--warmup-epochs", "inf"], "warmup_epochs must be a finite number"),
    (["--prior", "student-t", "--prior-df", "inf"], "prior_df must be a finite number"),
    (["--prior", "dirichlet", "--prior-concentration", "inf"], "prior_concentration must be a finite"),
    (["--prior", ":"], "neither a built-in name nor module:attribute"),
    (["--seed", "-1"], "seed must lie in [0, 2^32)"), (["--seed", str(2**32)], "seed must lie in [0, 2^32)"),
    (["--latent-dim", str(10**12)], "needs about"), (["--num-particles", str(10**12)], "needs about"),
    (["--prior", "flow", "--prior-flow-layers", str(10**12)], "needs about"),
    (["--prior", "mog", "--prior-components", str(10**12)], "needs about"),
])
def test_out_of_range_training_input_is_one_line(args, words, tmp_path, capsys):
    line = one_line_error(capsys, main(["train", "--out", str(tmp_path / "r"), "--quiet", *args]))
    assert words in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,words", [
    (["sample", "{run}", "--seed", "-1"], "--seed must lie"), (["evaluate", "{run}", "--seed", str(2**40)], "--seed"),
    (["analyze", "{run}", "--seed", "-1"], "--seed must be >= 0"), (["evaluate", "{run}", "--k", str(10**12)], "needs about"),
    (["evaluate", "{run}", "--samples", str(10**13)], "needs about"), (["sample", "{run}", "--n", str(10**13)], "needs about"),
])
def test_out_of_range_input_on_a_run_is_one_line(args, words, trained, capsys):
    args = [a.format(run=trained) for a in args]
    assert words in one_line_error(capsys, main(args))
    assert not (trained / "metrics.json").exists()


def test_a_study_checks_every_option_before_any_run(tmp_path, capsys):
    tiny = ["--epochs", "1", "--hidden-dim", "16", "--hidden-layers", "1", "--quiet"]
    for extra, words in ((["--k", "0"], "--k must be >= 1"), (["--betas", "0,inf"], "finite"),
                         (["--k", str(10**12)], "needs about")):
        command = "sweep-beta" if "--betas" in extra else "compare"
        args = [command, "--out", str(tmp_path / "s"), *tiny, *extra]
        if command == "compare":
            args += ["--priors", "normal"]
        assert words in one_line_error(capsys, main(args))
        assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- 4. outputs checked before the work


def test_outputs_are_checked_before_the_work(trained, tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.png").write_text("x")
    for command in ("sample", "reconstruct"):
        for out, words in ((tmp_path / "full", "is a directory"), (tmp_path / "afile" / "s.png", "is a file"),
                           (tmp_path / "afile" / "deeper" / "s.png", "is a file")):
            assert words in one_line_error(capsys, main([command, str(trained), "--out", str(out)]))
    started = __import__("time").perf_counter()
    line = one_line_error(capsys, main(["analyze", str(trained), "--out", str(tmp_path / "afile" / "a"), "--quiet"]))
    assert "is a file" in line and __import__("time").perf_counter() - started < 10  # no NUTS ran first
    assert (tmp_path / "full" / "keep.png").read_text() == "x"
    # as root every directory is writable: play a user who may not write into the run directory
    real_access = __import__("os").access
    monkeypatch.setattr("os.access", lambda p, mode: False if str(p) == str(trained) else real_access(p, mode))
    assert "not writable" in one_line_error(capsys, main(["evaluate", str(trained), "--quiet"]))
    assert not (trained / "metrics.json").exists()


# --------------------------------------------------------------------------- 5. no dead ends after faults


def test_an_interrupt_before_the_first_checkpoint_can_be_resumed(digits, tmp_path, monkeypatch):
    cfg = tiny_config(epochs=2)
    straight = train(cfg, tmp_path / "straight", data=digits, progress=False)
    train_module = __import__("pyro_vae.inference.train", fromlist=["_train_epoch"])
    real = train_module._train_epoch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt, match="no epoch had finished"):
        train(cfg, tmp_path / "cut", data=digits, progress=False)
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(train_module, "_train_epoch", real)
    resumed = resume(tmp_path / "cut", data=digits, progress=False)
    assert [r["valid_elbo"] for r in resumed.history] == [r["valid_elbo"] for r in straight.history]
    assert resumed.info["test_elbo"] == straight.info["test_elbo"]


def test_a_killed_start_and_a_diverged_first_epoch_are_no_dead_end(digits, tmp_path, monkeypatch):
    # what SIGKILL during the first epoch leaves: config, run.json "running", a half-written temporary file
    cfg = tiny_config(epochs=1)
    out = tmp_path / "killed"
    out.mkdir()
    (out / "config.json").write_text(cfg.to_json())
    (out / "run.json").write_text(json.dumps({"status": "running", "data": {}}))
    (out / ".checkpoint.pt.abc.tmp").write_bytes(b"half")
    assert resume(out, data=digits, progress=False).info["status"] == "finished"
    assert not list(out.glob(".*.tmp"))
    # a divergence in epoch 1 keeps nothing: the same --out takes a new start with other settings
    poisoned = tmp_path / "nan"
    train_module = __import__("pyro_vae.inference.train", fromlist=["_train_epoch"])
    real = train_module.evaluate_elbo
    monkeypatch.setattr(train_module, "evaluate_elbo", lambda *a, **k: math.nan)
    with pytest.raises(TrainingDiverged, match="nothing was kept"):
        train(cfg, poisoned, data=digits, progress=False)
    assert json.loads((poisoned / "run.json").read_text())["status"] == "diverged"
    monkeypatch.setattr(train_module, "evaluate_elbo", real)
    assert train(tiny_config(epochs=1, lr=1e-3), poisoned, data=digits, progress=False).info["status"] == "finished"


def test_a_failure_after_the_loop_is_recorded(digits, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("figures broke")

    monkeypatch.setattr("pyro_vae.plots.save_run_figures", broken)
    with pytest.raises(RuntimeError, match="figures broke"):
        train(tiny_config(epochs=1), tmp_path / "r", data=digits, progress=False)
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["status"] == "failed" and "figures broke" in info["error"]


def test_a_study_killed_mid_evaluation_starts_again(tmp_path):
    tiny = ["--epochs", "1", "--hidden-dim", "16", "--hidden-layers", "1", "--k", "5", "--quiet",
            "--priors", "normal", "--out", str(tmp_path / "s")]
    assert main(["compare", *tiny]) == 0
    run = tmp_path / "s" / "runs" / "normal-z2-s0"
    (run / "loglik_per_point.npy").unlink()  # killed between the two files of an evaluation
    assert main(["compare", *tiny]) == 0
    assert (run / "loglik_per_point.npy").is_file()


def test_leftover_temporary_files_are_cleaned_and_a_running_run_says_so(run_copy, capsys):
    (run_copy / ".model.pt.xyz.tmp").write_bytes(b"half")
    stale_figure = run_copy / "figures" / ".samples.png.q.tmp"  # a reader's: removed once it is an hour old
    stale_figure.write_bytes(b"half")
    __import__("os").utime(stale_figure, (0, 0))
    (run_copy / "figures" / ".fresh.png.r.tmp").write_bytes(b"being written by a sample command")
    _edit_json(run_copy / "run.json", status="running")
    assert main(["evaluate", str(run_copy), "--k", "2", "--samples", "4", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "marked 'running'" in err and "best weights so far" in err
    assert [p.name for p in run_copy.rglob(".*.tmp")] == [".fresh.png.r.tmp"]


def test_a_run_being_trained_is_not_trained_twice(run_copy):
    from pyro_vae.run_dir import RunFiles

    files = RunFiles(run_copy)
    with files.training_lock():
        assert files.being_trained()
        (run_copy / ".model.pt.xyz.tmp").write_bytes(b"being written")
        with pytest.raises(PyroVAEError, match="being trained by another process"):
            resume(run_copy, epochs=3, progress=False)
        _edit_json(run_copy / "run.json", status="running")
        assert "being trained right now" in load_run(run_copy).status_warning()
        assert (run_copy / ".model.pt.xyz.tmp").exists()  # not cleaned while a trainer holds the lock
    assert not files.being_trained()


# --------------------------------------------------------------------------- 6. argparse


def test_argparse_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--likelihood", "poisson", "--out", str(tmp_path / "r")])
    assert "invalid choice: 'poisson'" in one_line_error(capsys, stop.value.code)
    with pytest.raises(SystemExit) as stop:
        main(["train", "--latent-dim", "two"])
    assert "--latent-dim" in one_line_error(capsys, stop.value.code)


def test_the_weights_of_a_run_stay_weights(trained):
    """torch.load(weights_only=True) everywhere: a checkpoint that pickles an object is refused."""
    from pyro_vae.run_dir import torch_load

    evil = trained.parent / "evil.pt"
    torch.save({"x": __import__("pathlib").Path("x")}, evil)  # an object: needs pickle's code path
    with pytest.raises(PyroVAEError, match="cannot read"):
        torch_load(evil, "the weights")


def test_sigterm_ends_a_run_as_ctrl_c_does(tmp_path):
    """A scheduler's SIGTERM (or kill) is recorded as an interrupt, the last checkpoint is kept, and the run
    resumes."""
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pyro_vae.cli", "train", "--out", str(out), "--epochs", "500",
                             "--hidden-dim", "32", "--hidden-layers", "1", "--patience", "0", "--quiet"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").is_file() and time.time() < deadline:
        time.sleep(0.2)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and info["epochs_completed"] >= 1
    assert f"the checkpoint of epoch" in err and "--resume" in err
    assert main(["train", "--resume", str(out), "--epochs", str(info["epochs_completed"] + 1), "--quiet"]) == 0


def test_resuming_with_the_prior_object_imports_nothing(tmp_path, monkeypatch, digits):
    """resume(prior=obj): the run continues and finishes with the object, never importing the module its
    config.json names."""
    import sys

    marker = tmp_path / "marker"
    (tmp_path / "marked_prior.py").write_text(
        EVIL.format(marker=str(marker)) + "import torch, pyro.distributions as dist\n"
        "def cauchy(latent_dim):\n    return dist.Cauchy(torch.zeros(latent_dim), 1.0).to_event(1)\n")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--prior", "marked_prior:cauchy", "--epochs", "1", "--hidden-dim", "16", "--hidden-layers",
                 "1", "--out", "run", "--quiet"]) == 0
    prior = sys.modules["marked_prior"].cauchy
    marker.unlink()
    monkeypatch.delitem(sys.modules, "marked_prior")
    with pytest.raises(PyroVAEError, match="finished 1 epochs; to train it on, pass --epochs above 1"):
        resume(tmp_path / "run", data=digits, prior=prior, progress=False)
    run = resume(tmp_path / "run", data=digits, prior=prior, epochs=2, progress=False)
    assert run.info["status"] == "finished" and not marker.exists() and "marked_prior" not in sys.modules
    # the same for data-parallel training: a resumed run's module is not imported unasked
    from pyro_vae.inference.distributed import train_distributed
    from pyro_vae.run_dir import RunFiles

    with pytest.raises(PyroVAEError, match="--trust-prior"):
        train_distributed(RunFiles(tmp_path / "run").read_config(), tmp_path / "run", devices=2, resume=True,
                          data=digits, progress=False)
    assert not marker.exists()


def test_a_failed_background_write_fails_the_run_and_leaves_no_half_file(digits, tmp_path, monkeypatch):
    """Each epoch's checkpoint is written by a worker thread: a write that fails there (a full disk) fails the
    run in the training thread with that error, run.json says so, and the files on disk are whole ones."""
    import pyro_vae.atomic as atomic

    write = atomic.atomic_torch_save

    def fail_on_the_second_checkpoint(path, obj):
        if path.name == "checkpoint.pt" and (path.parent / "checkpoint.pt").exists():
            with atomic.atomic_path(path) as tmp:
                open(tmp, "wb").write(b"half")
                raise OSError(28, "No space left on device")
        write(path, obj)

    monkeypatch.setattr(atomic, "atomic_torch_save", fail_on_the_second_checkpoint)
    with pytest.raises(OSError, match="No space left"):
        train(tiny_config(epochs=4), tmp_path / "run", data=digits, progress=False)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "failed" and "No space left on device" in info["error"]
    assert not list((tmp_path / "run").glob(".*.tmp"))
    from pyro_vae.run_dir import RunFiles

    assert info["epochs_completed"] == RunFiles(tmp_path / "run").load_checkpoint().epoch == 1  # run.json names what is on disk
    monkeypatch.setattr(atomic, "atomic_torch_save", write)
    resumed = resume(tmp_path / "run", data=digits, progress=False)  # from the last checkpoint that was written
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4] and resumed.info["status"] == "finished"


def test_an_epoch_is_saved_as_it_was_when_it_ended(tmp_path):
    """The background writer works from copies: what changes after save_epoch returns is not written."""
    from pyro_vae.run_dir import Checkpoint, RunFiles

    files = RunFiles(tmp_path)
    weight = torch.zeros(1000, 100)
    history = [{"epoch": 1, "valid_elbo": -1.0}]
    info = {"name": "x"}
    files.save_epoch(info, history, Checkpoint(model={"w": weight}, optim={"state": {0: {"exp_avg": weight}}},
                                               rng={"cpu": torch.get_rng_state(), "cuda": None}, epoch=1,
                                               history=history, best=-1.0, best_epoch=1, stale=0),
                     best=True, status="running", epochs_completed=1)
    weight.fill_(float("nan"))  # the next optimizer step, in place
    history.append({"epoch": 2, "valid_elbo": 0.0})
    assert "status" not in info  # the caller's record takes the epoch once its files are written
    files.writes.wait()
    assert info["status"] == "running" and info["epochs_completed"] == 1
    assert json.loads((tmp_path / "run.json").read_text()) == info
    assert json.loads((tmp_path / "history.json").read_text()) == history[:1]
    saved = files.load_checkpoint()
    assert saved.epoch == 1 and saved.history == history[:1]
    assert torch.equal(saved.model["w"], torch.zeros(1000, 100))
    assert torch.equal(saved.optim["state"][0]["exp_avg"], torch.zeros(1000, 100))
    assert torch.equal(files.load_weights()["w"], torch.zeros(1000, 100))


def test_ctrl_c_while_the_writer_starts_is_held_until_it_has_started():
    """Python 3.11 can raise KeyboardInterrupt inside Thread.start() and its join() can then mistake a running
    writer for a finished one; the writer's start holds the signal and raises it once the start is recorded."""
    import signal

    from pyro_vae.atomic import _signals_held

    found = signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C's handler (a background job ignores it)
    try:
        reached = []
        with pytest.raises(KeyboardInterrupt):
            with _signals_held():
                signal.raise_signal(signal.SIGINT)
                reached.append("after the signal")
        assert reached == ["after the signal"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, found)


# --------------------------------------------------------------------------- outputs never replace inputs


@pytest.mark.parametrize("command", ["sample", "reconstruct"])
@pytest.mark.parametrize("target", ["model.pt", "config.json", "run.json", "figures/x.jpg"])
def test_an_image_never_overwrites_a_file_of_the_run(command, target, run_copy, capsys):
    before = {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()}
    line = one_line_error(capsys, main([command, str(run_copy), "--out", str(run_copy / target)]))
    assert "--out" in line
    assert {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()} == before
    assert load_run(run_copy).config.epochs == 2  # the run still opens


def test_a_study_of_one_kind_never_replaces_another(tmp_path, capsys):
    study = tmp_path / "s"
    study.mkdir()
    (study / "study.json").write_text(json.dumps({"kind": "compare", "settings": []}))
    (study / "report.md").write_text("the compare study's report")
    line = one_line_error(capsys, main(["sweep-beta", "--betas", "0,1", "--epochs", "1", "--out", str(study),
                                        "--quiet"]))
    assert "holds a 'compare' study" in line
    assert (study / "report.md").read_text() == "the compare study's report" and not (study / "runs").exists()


@pytest.mark.parametrize("change,words", [({"status": 42}, "status must be one of"),
                                          ({"epochs_completed": -5}, "epochs_completed must be a whole number"),
                                          ({"best_epoch": "two"}, "best_epoch must be a whole number"),
                                          ({"stopped_early": "no"}, "stopped_early must be true or false")])
def test_a_hand_edited_run_json_is_refused_before_any_work(change, words, run_copy, capsys):
    _edit_json(run_copy / "run.json", **change)
    before = {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()}
    for command in (["sample", str(run_copy), "--out", str(run_copy.parent / "s.png")],
                    ["evaluate", str(run_copy), "--k", "2", "--quiet"], ["train", "--resume", str(run_copy), "--quiet"]):
        line = one_line_error(capsys, main(command))
        assert words in line and "run.json" in line, line
    assert {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()} == before
    assert not (run_copy.parent / "s.png").exists()


@pytest.mark.parametrize("flags,words", [(["--devices", "0"], "--devices and --num-nodes must be >= 1"),
                                         (["--devices", "-1"], "--devices and --num-nodes must be >= 1"),
                                         (["--num-nodes", "0"], "--devices and --num-nodes must be >= 1"),
                                         (["--devices", "999"], "CPU processes on a machine of"),
                                         (["--devices", "2", "--accelerator", "cuda"], "GPUs;")])
def test_device_counts_are_checked_before_any_process_starts(flags, words, tmp_path, capsys):
    if "cuda" in flags and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    line = one_line_error(capsys, main(["train", "--epochs", "1", "--out", str(tmp_path / "r"), "--quiet", *flags]))
    assert words in line
    assert not (tmp_path / "r").exists()


def test_a_study_of_more_seeds_than_it_can_train_is_one_line(tmp_path, capsys):
    (tmp_path / "s.toml").write_text("[study]\nseeds = 1000000000000\n")
    line = one_line_error(capsys, main(["compare", "--config", str(tmp_path / "s.toml"), "--priors", "normal",
                                        "--out", str(tmp_path / "s"), "--quiet"]))
    assert "--seeds 1000000000000 is more than a study can train" in line and not (tmp_path / "s").exists()


@pytest.mark.parametrize("source,words", [("def cauchy(d:\n", "a syntax error in"),
                                          ("raise RuntimeError('no GPU here\\nsecond line')\n",
                                           "raised RuntimeError: no GPU here")])
def test_a_prior_module_that_fails_to_import_is_one_line(source, words, tmp_path, capsys, monkeypatch):
    (tmp_path / "broken_prior_mod.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, main(["train", "--prior", "broken_prior_mod:cauchy", "--epochs", "1",
                                        "--out", str(tmp_path / "r"), "--quiet"]))
    assert words in line and "broken_prior_mod" in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("uri", ["bogus://x", "file://{tmp}/afile/mlruns", "http://127.0.0.1:9"])
def test_a_bad_mlflow_tracking_uri_is_one_line(uri, tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlflow")
    (tmp_path / "afile").write_text("x")
    uri = uri.format(tmp=tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    line = one_line_error(capsys, main(["train", "--log", "mlflow", "--epochs", "1", "--out", str(tmp_path / "r"),
                                        "--quiet"]))
    assert "--log mlflow" in line and "MLFLOW_TRACKING_URI" in line
    # no dead end: the same command starts the run again once the store works
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert main(["train", "--log", "mlflow", "--epochs", "1", "--out", str(tmp_path / "r"), "--quiet"]) == 0


@pytest.mark.parametrize("how", [["train", "--resume", "{run}", "--quiet"],
                                 ["train", "--epochs", "2", "--out", "{run}", "--quiet"]])
def test_a_kill_during_the_first_checkpoint_is_no_dead_end(how, run_copy, capsys):
    """SIGKILL while epoch 1's checkpoint.pt was being written: model.pt and history.json of that epoch are
    on disk, the checkpoint only as a temporary file, and run.json still says running with no epoch."""
    (run_copy / "checkpoint.pt").unlink(missing_ok=True)
    (run_copy / ".checkpoint.pt.1234.tmp").write_bytes(b"half a checkpoint")
    for name in ("metrics.json", "loglik_per_point.npy"):
        (run_copy / name).unlink(missing_ok=True)
    shutil.rmtree(run_copy / "figures", ignore_errors=True)
    info = json.loads((run_copy / "run.json").read_text())
    for key in ("epochs_completed", "best_epoch", "best_valid_elbo", "test_elbo", "finished", "stopped_early"):
        info.pop(key, None)
    (run_copy / "run.json").write_text(json.dumps({**info, "status": "running"}))
    assert main([part.format(run=run_copy) for part in how]) == 0
    assert json.loads((run_copy / "run.json").read_text())["status"] == "finished"
    assert not list(run_copy.glob(".*.tmp"))


@pytest.mark.parametrize("flags,words", [
    (["--cpus-per-run", "100000"], "--cpus-per-run 100000: this machine has"),
    (["--gpus-per-run", "nan"], "--gpus-per-run a number >= 0"),
    (["--gpus-per-run", "1"], "--gpus-per-run 1: this machine has 0 GPUs"),
    (["--executor", "ray", "--ray-address", "not an address"], "is not HOST:PORT"),
    (["--executor", "ray", "--ray-address", "127.0.0.1:1"], "cannot reach the Ray cluster"),
])
def test_a_study_asks_only_for_what_the_machine_has(flags, words, tmp_path, capsys):
    if "--gpus-per-run" in flags and flags[-1] == "1" and torch.cuda.device_count():
        pytest.skip("this machine has a GPU")
    line = one_line_error(capsys, main(["compare", "--priors", "normal", "--epochs", "1", "--out", str(tmp_path / "s"),
                                        "--quiet", *flags]))
    assert words in line
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("flag", ["--particles", "--draws", "--chains"])
def test_an_analysis_that_would_never_end_is_one_line(flag, trained, capsys):
    line = one_line_error(capsys, main(["analyze", str(trained), flag, str(10**12), "--quiet"]))
    assert f"{flag} must be at most" in line


def test_a_raw_pickle_as_model_pt_is_one_line(run_copy, capsys):
    import pickle

    import warnings

    (run_copy / "model.pt").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with warnings.catch_warnings(record=True) as caught:  # a warning would print lines of its own
        warnings.simplefilter("always")
        line = one_line_error(capsys, main(["sample", str(run_copy), "--out", str(run_copy.parent / "s.png")]))
    assert "model.pt" in line and not [str(w.message) for w in caught]


def test_a_prior_whose_parameters_torch_refuses_is_one_line(tmp_path, capsys):
    line = one_line_error(capsys, main(["train", "--prior", "laplace", "--prior-scale", "1e-320", "--epochs", "1",
                                        "--out", str(tmp_path / "r"), "--quiet"]))
    assert "the prior failed when called" in line and "tensor(" in line  # the tensor stays, on the same line


@pytest.mark.parametrize("text,words", [("[]", "holds 0 epochs where run.json records 2"),
                                        ('[{"epoch": 1, "valid_elbo": -3.0}]', "holds 1 epochs where run.json records 2"),
                                        ('[{"epoch": 1, "valid_elbo": "high"}, {"epoch": 2, "valid_elbo": -1}]',
                                         "record 1 is not epoch 1"),
                                        ('{"epoch": 1}', "expected a list of per-epoch records")])
def test_a_truncated_or_mistyped_history_is_said(text, words, run_copy, capsys):
    """Sampling and reconstructing do not need the history, so they go on, with one warning line saying
    what is wrong with it (the Python API keeps it as Run.history_problem)."""
    (run_copy / "history.json").write_text(text)
    for command in (["sample", str(run_copy), "--n", "4", "--out", str(run_copy.parent / "s.png")],
                    ["reconstruct", str(run_copy), "--n", "4", "--out", str(run_copy.parent / "r.png")]):
        assert main(command) == 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("pyro-vae: warning:") and words in err[0], err
    assert words in load_run(run_copy).history_problem


def test_a_data_parallel_refusal_comes_before_any_process_starts(tmp_path):
    pytest.importorskip("lightning_fabric")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pyro_vae.cli", "train", "--devices", "2", "--epochs", "1", "--out",
                           str(tmp_path / "full"), "--quiet"], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "already exists and is not empty" in lines[0], lines
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep"]  # no config.json, no run.json


def test_a_data_parallel_resume_of_another_world_size_is_refused_before_fabric(tmp_path):
    pytest.importorskip("lightning_fabric")
    import subprocess
    import sys

    def stop(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(epochs=3), tmp_path / "r", progress=False, on_epoch_end=stop)
    assert (tmp_path / "r" / "checkpoint.pt").is_file()
    proc = subprocess.run([sys.executable, "-m", "pyro_vae.cli", "train", "--resume", str(tmp_path / "r"), "--devices",
                           "2", "--quiet"], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "was trained on 1 process(es)" in lines[0], lines


def test_an_mlflow_server_that_never_answers_fails_in_one_line(tmp_path, capsys, monkeypatch):
    """A port that takes the connection and never replies (a listening socket nobody serves): MLflow's
    request times out (shortened here to 2 s) and the run refuses in one line instead of hanging."""
    pytest.importorskip("mlflow")
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        line = one_line_error(capsys, main(["train", "--log", "mlflow", "--epochs", "1", "--out", str(tmp_path / "r"),
                                            "--quiet"]))
        assert "--log mlflow" in line
    finally:
        server.close()


def test_data_parallel_training_refuses_what_its_loop_does_not_do(tmp_path):
    """The data-parallel loop calls no prior hook after an epoch: a re-seeded mixture is refused there, in one
    line, rather than trained without its re-seeding."""
    pytest.importorskip("lightning_fabric")
    from pyro_vae.inference.distributed import train_distributed

    config = tiny_config(prior="mog", prior_weights="uniform", prior_reseed=True, epochs=1)
    with pytest.raises(PyroVAEError, match="does not support --prior-reseed"):
        train_distributed(config, tmp_path / "r", devices=2)
    assert not (tmp_path / "r").exists()
