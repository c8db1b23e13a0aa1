"""A study that cannot mislead: stale runs refused, flags that would be ignored refused or warned about,
ELBO surgery on like points, collapse and non-convergence flagged, priors of your own that travel."""

import json
import math
import os
import shutil

import pytest
import torch
from torch import nn

from pyro_vae import PyroVAEError, load_run, train
from pyro_vae.cli import main
from pyro_vae.inference.evaluate import evaluate, format_table

from conftest import tiny_config

TINY = ["--hidden-dim", "16", "--hidden-layers", "1", "--k", "5", "--quiet"]


def test_a_study_refuses_runs_trained_with_other_settings(tmp_path, capsys):
    args = ["compare", "--priors", "normal", "--out", str(tmp_path / "s"), *TINY]
    assert main([*args, "--epochs", "1"]) == 0
    assert main([*args, "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "epochs=1 (wanted 2)" in err and "--restart" in err
    assert json.loads((tmp_path / "s" / "runs" / "normal-z2-s0" / "run.json").read_text())["epochs_completed"] == 1
    assert main([*args, "--epochs", "2", "--restart"]) == 0
    assert json.loads((tmp_path / "s" / "runs" / "normal-z2-s0" / "run.json").read_text())["epochs_completed"] == 2
    assert "at most 2 epochs" in (tmp_path / "s" / "report.md").read_text()


@pytest.mark.parametrize("command,flag,words", [
    (["compare", "--priors", "normal"], ["--prior", "laplace"], "takes --priors, not --prior"),
    (["compare", "--priors", "normal"], ["--latent-dim", "3"], "takes --latent-dims, not --latent-dim"),
    (["sweep-beta", "--betas", "1"], ["--beta", "2"], "takes --betas, not --beta"),
])
def test_flags_a_study_would_ignore_are_refused(command, flag, words, tmp_path, capsys):
    assert main([*command, *flag, "--out", str(tmp_path / "s"), "--epochs", "1", *TINY]) == 2
    assert words in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_prior_flags_without_effect_are_warned_about(tmp_path, capsys):
    assert main(["train", "--prior-df", "5", "--prior-components", "4", "--out", str(tmp_path / "r"), "--epochs",
                 "1", "--hidden-dim", "16", "--hidden-layers", "1", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: --prior-df has no effect with --prior normal" in err
    assert "warning: --prior-components has no effect" in err
    assert main(["train", "--prior", "student-t", "--prior-df", "5", "--out", str(tmp_path / "t"), "--epochs", "1",
                 "--hidden-dim", "16", "--hidden-layers", "1", "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_elbo_surgery_compares_like_with_like(digits, tmp_path):
    run = train(tiny_config(epochs=3, latent_dim=4), tmp_path / "r", data=digits, progress=False)
    metrics = evaluate(run, num_particles=20, num_samples=50, progress=False, save=False)
    agg = metrics["aggregate_posterior"]
    assert agg["num_points"] == min(2000, len(digits.test))
    same, surgery = agg["rate_same_points"], agg["rate_from_surgery"]
    assert surgery[0] == pytest.approx(same[0], abs=4 * math.hypot(same[1], surgery[1]) + 0.05)
    table = format_table(metrics)
    assert f"N = {agg['num_points']}" in table and "<= log N" in table and "depends on N" in table
    assert "continuous Bernoulli" in table  # why log p(x) is positive on grey-level digits


def test_collapse_and_non_convergence_are_flagged(digits, tmp_path):
    collapsed = train(tiny_config(epochs=3, beta=200.0), tmp_path / "c", data=digits, progress=False)
    metrics = evaluate(collapsed, num_particles=5, num_samples=20, progress=False)
    assert any(w.startswith("posterior collapse") for w in metrics["warnings"])
    assert "warning: posterior collapse" in format_table(metrics)
    still_rising = train(tiny_config(epochs=2, lr=1e-3), tmp_path / "n", data=digits, progress=False)
    assert still_rising.info["best_epoch"] == 2
    assert any(w.startswith("not converged") for w in evaluate(still_rising, num_particles=5, num_samples=20,
                                                                progress=False, save=False)["warnings"])


def test_the_report_flags_runs_per_row(tmp_path):
    assert main(["sweep-beta", "--betas", "1,200", "--epochs", "2", "--out", str(tmp_path / "s"), *TINY]) == 0
    report = (tmp_path / "s" / "report.md").read_text()
    rows = [ln for ln in report.splitlines() if ln.startswith("| 200 |")]
    assert rows and "⚠" in rows[0] and "posterior collapse" in rows[0]
    assert "## Health and how to read the numbers" in report and "**beta200-z2-s0**: posterior collapse" in report
    assert "log N" in report and "continuous Bernoulli" in report


# --------------------------------------------------------------------------- priors of your own that travel


PRIOR_MODULE = '''
import torch, pyro.distributions as dist
from torch import nn

class ScaledLaplace(nn.Module):
    def __init__(self, latent_dim, width=1.0):
        super().__init__()
        self.width = width
        self.register_buffer("loc", torch.zeros(latent_dim))

    def forward(self):
        return dist.Laplace(self.loc, self.width).to_event(1)

def student(latent_dim, df=3.0):
    return dist.StudentT(df, torch.zeros(latent_dim), 1.0).to_event(1)
'''


def test_an_instance_of_an_importable_class_is_recorded_by_name(tmp_path, monkeypatch, digits):
    (tmp_path / "mine.py").write_text(PRIOR_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import mine

    run = train(tiny_config(epochs=1), tmp_path / "r", data=digits, progress=False, prior=mine.ScaledLaplace(2, 0.7))
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (config["prior"], config["prior_args"]) == ("mine:ScaledLaplace", {"width": 0.7})
    reloaded = load_run(tmp_path / "r", trust=True)
    assert reloaded.vae.prior.width == 0.7
    assert torch.equal(reloaded.vae.prior().base_dist.scale, run.vae.prior().base_dist.scale)


def test_a_run_from_a_prior_file_loads_from_elsewhere(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "my_prior_file.py").write_text(PRIOR_MODULE)
    monkeypatch.chdir(project)
    assert main(["train", "--prior", "my_prior_file:student", "--prior-arg", "df=2.5", "--out", "run", "--epochs", "1",
                 "--hidden-dim", "16", "--hidden-layers", "1", "--quiet"]) == 0
    config = json.loads((project / "run" / "config.json").read_text())
    assert config["prior_args"] == {"df": 2.5} and config["prior_path"] == str(project.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delitem(__import__("sys").modules, "my_prior_file")
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in (str(project), os.getcwd())])
    run = load_run(project / "run", trust=True)
    assert run.vae.prior().base_dist.df.unique().item() == 2.5
    # the folder gone: one line naming the module and how to make it importable
    shutil.move(project / "my_prior_file.py", tmp_path / "moved.py")
    monkeypatch.delitem(__import__("sys").modules, "my_prior_file")
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p != str(project.resolve())])
    with pytest.raises(PyroVAEError, match="make 'my_prior_file' importable"):
        load_run(project / "run", trust=True)


def test_prior_args_are_checked(tmp_path, monkeypatch, capsys):
    (tmp_path / "mine2.py").write_text(PRIOR_MODULE)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--prior", "mine2:student", "--prior-arg", "colour=3", "--out", "r", "--quiet"]) == 2
    assert "does not take it" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--prior-arg", "no-equals-sign"])
    assert "expected NAME=VALUE" in capsys.readouterr().err


def test_a_collapsed_posterior_looks_collapsed(digits):
    """d > 2: the latent plot spans the prior's draws, so codes all at the centre are a dot in the cloud."""
    import matplotlib.pyplot as plt

    from pyro_vae import build_vae
    from pyro_vae.plots import draw_latent_space

    vae = build_vae(tiny_config(latent_dim=4), digits.dim, digits.image_shape, digits.binary)
    with torch.no_grad():
        for module in vae.guide_dist.encoder.modules():
            if isinstance(module, nn.Linear):
                module.weight.zero_()
                module.bias.zero_()
    fig, ax = plt.subplots()
    draw_latent_space(ax, vae, digits.test[:200], digits.test_labels[:200])
    lo, hi = ax.get_xlim()
    assert hi - lo > 3  # the prior's scale, not the codes' (which all sit at 0)
    assert ax.get_legend() is not None and "prior draws" in ax.get_legend().get_texts()[0].get_text()
    plt.close(fig)
