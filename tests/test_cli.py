"""The command line: a full run, the follow-up commands, and one clear line with exit status 2 for bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

from pyro_vae.cli import build_parser, main
from pyro_vae.config import Config

from conftest import SHARED_BINARIZED_MNIST

TINY = ["--epochs", "2", "--hidden-dim", "32", "--hidden-layers", "1", "--quiet"]


def in_process(capsys, *args):
    """main() here, as the console script calls it: (exit status, stdout, stderr). A fresh process (run_cli)
    also shows what importing prints; each costs seconds, so only some cases take one."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "pyro_vae.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_train_sample_reconstruct(tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli("train", "--out", out, "--latent-dim", "3", *TINY)
    assert code == 0, stderr
    assert "test ELBO" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["latent_dim"] == 3 and config["epochs"] == 2
    assert main(["sample", str(out), "--n", "9", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 500
    assert main(["reconstruct", str(out), "--n", "4"]) == 0
    assert (out / "figures" / "reconstructions-test.png").is_file()
    # extending a finished run: --resume with more epochs
    assert main(["train", "--resume", str(out), "--epochs", "3", "--no-jit", "--quiet"]) == 0
    assert len(json.loads((out / "history.json").read_text())) == 3
    info = json.loads((out / "run.json").read_text())
    assert info["elbo"] == "DirectELBO" and info["not_compiled_because"] == "--no-jit"
    assert "objective: DirectELBO (not compiled: the run has" in stdout


def test_help_lists_every_config_field():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for name in Config.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dataset", "mnist-typo"], "unknown dataset"),
        (["--latent-dim", "0"], "latent_dim must be >= 1"),
        (["--dataset", "{tmp}/missing.npy"], "does not exist"),
        (["--dataset", "{tmp}/wrong.npy"], "expected images of shape"),
        (["--likelihood", "bernoulli"], "needs binary data"),
        (["--prior", "cauchy-typo"], "unknown prior"),
        (["--device", "cuda"], "CUDA"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(args, message, tmp_path, capsys):
    np.save(tmp_path / "wrong.npy", np.zeros((4, 2, 2, 2)))
    args = [a.format(tmp=tmp_path) for a in args]
    if args == ["--device", "cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
    out = tmp_path / "run"
    fresh = message in ("unknown dataset", "needs binary data")  # a new process: nothing else on stderr either
    code, stdout, stderr = (run_cli if fresh else lambda *a: in_process(capsys, *a))("train", "--out", out, *TINY,
                                                                                      *args)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], stderr
    assert not out.exists()


def test_unknown_likelihood_is_refused_by_the_parser(tmp_path):
    code, _, stderr = run_cli("train", "--out", tmp_path / "run", "--likelihood", "poisson")
    assert code == 2 and "invalid choice: 'poisson'" in stderr
    assert not (tmp_path / "run").exists()


def test_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for command in ("sample", "reconstruct"):
        code, _, stderr = (run_cli(command, tmp_path / "empty") if command == "sample"
                           else in_process(capsys, command, tmp_path / "empty"))
        assert code == 2 and "is not a pyro-vae run directory" in stderr and len(stderr.strip().splitlines()) == 1
        code, _, stderr = in_process(capsys, command, tmp_path / "nope")
        assert code == 2 and "does not exist" in stderr
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.skipif(not SHARED_BINARIZED_MNIST.is_dir(), reason="the shared binarized MNIST copy is not beside the repo")
def test_static_binarized_mnist_trains_through_the_cli(tmp_path):
    out = tmp_path / "bmnist"
    code, stdout, stderr = run_cli("train", "--dataset", "binarized-mnist", "--data-root", SHARED_BINARIZED_MNIST,
                                   "--out", out, "--epochs", "2", "--latent-dim", "16", "--hidden-dim", "128",
                                   "--hidden-layers", "1", "--batch-size", "256", "--quiet")
    assert code == 0, stderr
    history = json.loads((out / "history.json").read_text())
    assert history[1]["valid_elbo"] > history[0]["valid_elbo"]
    info = json.loads((out / "run.json").read_text())
    assert info["data"]["n_test"] == 10_000 and info["data"]["binary"]
    assert -250 < info["test_elbo"] < -100


def test_train_ends_with_the_health_hint_and_logs_carry_no_bar_codes(tmp_path, capsys):
    """A run whose best epoch is its last says so when train ends, with the command that trains it on; a
    study writing to a file (not a terminal) prints lines, never a progress bar's carriage returns."""
    assert main(["train", "--epochs", "2", "--hidden-dim", "16", "--patience", "0", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr()
    assert json.loads((tmp_path / "r" / "run.json").read_text())["best_epoch"] == 2  # still improving
    assert "warning: not converged" in out.out and f"--resume {tmp_path / 'r'} --epochs 4" in out.out
    assert main(["compare", "--priors", "normal", "--epochs", "1", "--hidden-dim", "16", "--k", "5",
                 "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr()
    assert "\r" not in out.err and "\x1b[" not in out.err
    assert "evaluate normal-z2-s0: ELBO (1/6)" in out.err  # the stages, as lines


def test_a_study_lists_only_the_flags_it_takes(capsys):
    """compare refuses --prior and --latent-dim (each setting sets them), sweep-beta --beta and --latent-dim:
    their --help does not offer them, and the refusal names the flag to use."""
    for command, hidden, offered in (("compare", ("--prior PRIOR", "--latent-dim LATENT_DIM"), "--priors"),
                                     ("sweep-beta", ("--beta BETA", "--latent-dim LATENT_DIM"), "--betas")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert offered in text and not any(h in text for h in hidden), command
