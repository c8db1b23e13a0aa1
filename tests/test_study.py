"""A tiny study end to end: the report's tables must say what the run directories' metrics say."""

import json
import math

import numpy as np
import torch
import pytest

from pyro_vae.cli import main

TINY = ["--epochs", "1", "--hidden-dim", "32", "--hidden-layers", "1", "--k", "20", "--quiet"]


def _table(report: str, heading: str) -> dict[str, list[str]]:
    section = report[report.index(heading):]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
        if not ln.startswith("|"):
            break
    return rows


def _number(cell: str) -> float:
    return float(cell.split("±")[0])


def test_compare_report_matches_the_runs(tmp_path):
    out = tmp_path / "study"
    assert main(["compare", "--priors", "normal,laplace", "--latent-dims", "2", "--out", str(out), *TINY]) == 0
    report = (out / "report.md").read_text()
    rows = _table(report, "## Latent size 2")
    assert set(rows) == {"normal", "laplace"}
    for prior in ("normal", "laplace"):
        m = json.loads((out / "runs" / f"{prior}-z2-s0" / "metrics.json").read_text())
        row = rows[prior]
        assert _number(row["log p(x)"]) == pytest.approx(m["log_likelihood"][0], abs=0.006)
        assert float(row["log p(x)"].split("±")[1]) == pytest.approx(m["log_likelihood"][1], abs=0.006)
        assert _number(row["rate"]) == pytest.approx(m["rate"][0], abs=0.006)
        assert _number(row["hole score"]) == pytest.approx(m["aggregate_posterior"]["hole_score"][0], abs=6e-4)
        assert int(row["active units"]) == m["active_units"]
        assert _number(row["FD prior samples"]) == pytest.approx(m["sample_quality"]["prior"]["frechet_distance"],
                                                                 abs=0.06)
    a = np.load(out / "runs" / "normal-z2-s0" / "loglik_per_point.npy")
    b = np.load(out / "runs" / "laplace-z2-s0" / "loglik_per_point.npy")
    paired = rows["laplace"]["vs first (paired)"]
    assert _number(paired) == pytest.approx((b - a).mean(), abs=0.006)
    assert float(paired.split("±")[1]) == pytest.approx((b - a).std(ddof=1) / math.sqrt(len(a)), abs=0.006)
    for figure in ("samples-z2", "reconstructions-z2", "aggregate-posterior-z2", "interpolations-z2"):
        assert f"figures/{figure}.png" in report and (out / "figures" / f"{figure}.png").is_file()
    assert "<table>" in (out / "report.html").read_text()

    # started again, the study skips finished runs
    stamp = (out / "runs" / "normal-z2-s0" / "model.pt").stat().st_mtime_ns
    assert main(["compare", "--priors", "normal,laplace", "--latent-dims", "2", "--out", str(out), *TINY]) == 0
    assert (out / "runs" / "normal-z2-s0" / "model.pt").stat().st_mtime_ns == stamp


def test_a_sphere_compared_at_its_manifolds_dimension(tmp_path, capsys):
    """--latent-dim-offsets sphere=1: at latent size 2 the sphere run has latent_dim 3 (S^2 in R^3), sits in the
    same table as the Gaussian in R^2, paired with it, and the report says so."""
    out = tmp_path / "study"
    assert main(["compare", "--priors", "normal,sphere", "--latent-dims", "2", "--latent-dim-offsets", "sphere=1",
                 "--out", str(out), *TINY]) == 0
    dims = {p: json.loads((out / "runs" / f"{p}-z2-s0" / "config.json").read_text())["latent_dim"]
            for p in ("normal", "sphere")}
    assert dims == {"normal": 2, "sphere": 3}
    report = (out / "report.md").read_text()
    rows = _table(report, "## Latent size 2")
    assert set(rows) == {"normal", "sphere"} and "±" in rows["sphere"]["vs first (paired)"]
    assert "the sphere runs have latent_dim d + 1" in report and "## Latent size 3" not in report
    for offsets, words in (("sphere=one", "PRIOR=N with N a whole number"), ("sphere=\u00b2", "whole number"),
                           ("sphere=1,sphere=2", "names sphere twice"), ("spherical=1", "unknown priors spherical")):
        assert main(["compare", "--priors", "normal,sphere", "--latent-dim-offsets", offsets,
                     "--out", str(tmp_path / "s2"), *TINY]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert main(["compare", "--priors", "normal", "--latent-dims", "2", "--latent-dim-offsets", "sphere=1",
                 "--out", str(tmp_path / "s3"), *TINY]) == 0  # an offset for a prior the study leaves out: said
    assert "--latent-dim-offsets names sphere, which --priors normal leaves out" in capsys.readouterr().err
    (tmp_path / "offsets.toml").write_text("[study]\nlatent_dim_offsets = {sphere = 1}\n")
    assert main(["sweep-beta", "--config", str(tmp_path / "offsets.toml"), "--out", str(tmp_path / "s2"), *TINY]) == 2
    assert "latent_dim_offsets is for compare" in capsys.readouterr().err
    assert not (tmp_path / "s2").exists()


def test_beta_sweep_report_with_seeds(tmp_path):
    out = tmp_path / "sweep"
    assert main(["sweep-beta", "--betas", "0,1", "--seeds", "2", "--latent-dims", "2", "--out", str(out), *TINY]) == 0
    report = (out / "report.md").read_text()
    rows = _table(report, "## Latent size 2")
    assert set(rows) == {"0", "1"}
    holes = [json.loads((out / "runs" / f"beta0-z2-s{s}" / "metrics.json").read_text())["aggregate_posterior"]
             ["hole_score"][0] for s in (0, 1)]
    mean, sd = (float(v) for v in rows["0"]["hole score"].split("±"))
    assert mean == pytest.approx(np.mean(holes), abs=6e-4) and sd == pytest.approx(np.std(holes, ddof=1), abs=6e-4)
    assert "What the sweep measured" in report and (out / "figures" / "beta-z2.png").is_file()


def test_study_bad_input(tmp_path):
    assert main(["compare", "--priors", "normal,nope", "--out", str(tmp_path / "s"), *TINY]) == 2
    assert main(["sweep-beta", "--betas", "0,-1", "--out", str(tmp_path / "s"), *TINY]) == 2
    assert main(["sweep-beta", "--betas", "a", "--out", str(tmp_path / "s"), *TINY]) == 2
    # a combination that cannot be built is refused before any run trains
    assert main(["compare", "--priors", "normal,projected-normal", "--latent-dims", "2,8", "--out",
                 str(tmp_path / "s"), *TINY]) == 2
    assert not (tmp_path / "s").exists()


def test_evaluate_and_the_study_fit_the_ex_post_mixture_to_the_same_binarized_images(digits, tmp_path, monkeypatch):
    """Under --binarize the training images a run saw are binary; the ex-post mixture of evaluate and
    of the study's figures is fitted to exactly those, not to the grey levels."""
    from pyro_vae import load_run, train
    from pyro_vae.data import fixed_binarization
    from pyro_vae.inference.evaluate import evaluate
    from pyro_vae.inference.metrics import ExPostMixture
    from pyro_vae.study import Setting
    from pyro_vae.study.figures import study_figures

    from conftest import tiny_config

    cfg = tiny_config(epochs=1, binarize=True)
    train(cfg, tmp_path / "study" / "runs" / "bin", data=digits, progress=False)
    fitted = []
    init = ExPostMixture.__init__
    monkeypatch.setattr(ExPostMixture, "__init__", lambda self, vae, x, **kw: fitted.append(x) or init(self, vae, x, **kw))
    evaluate(load_run(tmp_path / "study" / "runs" / "bin"), num_particles=5, num_samples=20, progress=False,
             save=False)
    study_figures([Setting("bin", cfg, "normal", 2, 0)], tmp_path / "study", tmp_path / "study" / "figures", 2)
    assert len(fitted) == 2
    expected = fixed_binarization(digits.train, "train")
    for x in fitted:
        assert torch.equal(x, expected[: len(x)]) and len(x) == len(digits.train)


def test_a_study_of_a_prior_of_your_own(tmp_path, monkeypatch):
    """A prior named module:attribute on the study's command line is the caller's: the study trains,
    evaluates and reports it (and imports it again when started again)."""
    (tmp_path / "my_priors.py").write_text(
        "import torch, pyro.distributions as dist\n"
        "def cauchy(latent_dim):\n"
        "    return dist.Cauchy(torch.zeros(latent_dim), torch.ones(latent_dim)).to_event(1)\n")
    monkeypatch.chdir(tmp_path)
    args = ["compare", "--priors", "normal,my_priors:cauchy", "--latent-dims", "2", "--out", "s", *TINY]
    assert main(args) == 0
    assert "my_priors:cauchy" in (tmp_path / "s" / "report.md").read_text()
    assert main(args) == 0
