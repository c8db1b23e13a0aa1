"""The published recipe's parts: the gated MLP, the bounded log-variance guide, the learning-rate
schedules, AdamNormGrad, the pseudo-input initialisation, config files and recipes, and evaluation
with K = 5000 in bounded memory."""

import copy
import json
import math
import warnings

import pyro
import pytest
import torch

from pyro_vae import Config, PyroVAEError, build_vae, resume, train
from pyro_vae.cli import main
from pyro_vae.config_file import read_config_file, recipes
from pyro_vae.inference.direct import DirectELBO
from pyro_vae.inference.metrics import iw_batch_size, iw_log_likelihood
from pyro_vae.inference.objectives import KLWeight
from pyro_vae.inference.step import TrainingStep
from pyro_vae.models.networks import GatedDense, gated_mlp

from conftest import tiny_config


# --------------------------------------------------------------------------- networks and guide


def test_gated_dense_is_a_linear_unit_times_a_sigmoid_gate():
    layer = GatedDense(5, 3)
    x = torch.randn(4, 5)
    expected = (x @ layer.h.weight.T + layer.h.bias) * torch.sigmoid(x @ layer.g.weight.T + layer.g.bias)
    assert torch.allclose(layer(x), expected)
    net = gated_mlp(784, 300, 2, 80)
    assert [type(m).__name__ for m in net] == ["GatedDense", "GatedDense", "Linear"]
    weights = net[0].h.weight  # He initialisation: N(0, 2 / fan_in)
    assert weights.mean().abs() < 0.002 and weights.std().item() == pytest.approx(math.sqrt(2 / 784), rel=0.02)


def test_a_gated_vae_with_the_bounded_log_variance_trains(digits, tmp_path):
    run = train(tiny_config(network="gated-mlp", guide_scale="bounded-logvar", epochs=3), tmp_path / "g",
                data=digits, progress=False)
    assert run.history[-1]["valid_elbo"] > run.history[0]["valid_elbo"]
    h = torch.tensor([[0.0, 0.0, -100.0, 100.0]])  # mu = (0, 0); log-variance far below and above its bounds
    scale = run.vae.guide_dist.family(h).base_dist.scale
    assert torch.allclose(scale, torch.tensor([[math.exp(-3), math.exp(1)]]))


# --------------------------------------------------------------------------- the optimiser and its schedule


def test_adam_normgrad_divides_each_gradient_by_its_norm(digits):
    cfg = tiny_config(optimizer="adam-normgrad", clip_norm=0.0, jit=False, lr=1e-2)
    torch.manual_seed(0)
    vae = build_vae(cfg, digits.dim, digits.image_shape, digits.binary)
    reference = copy.deepcopy(vae)
    x = digits.train[:32]
    torch.manual_seed(1)
    TrainingStep(vae, cfg, KLWeight(1.0)).step(x)
    pyro.clear_param_store()
    torch.manual_seed(1)
    DirectELBO(reference)(x, 1.0).backward()  # the step's loss (tests/test_direct.py: Trace_ELBO's to rounding)
    params = list(reference.parameters())
    for p in params:
        p.grad = p.grad / (p.grad.norm() + 1e-7)
    torch.optim.Adam(params, lr=1e-2, fused=True).step()  # the step's Adam (fused)
    for a, b in zip(vae.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_learning_rate_schedules(digits):
    vae = build_vae(tiny_config(), digits.dim, digits.image_shape, digits.binary)
    plateau = TrainingStep(vae, tiny_config(lr=1.0, lr_schedule="plateau", lr_patience=2, lr_factor=0.5,
                                            lr_min=0.2), KLWeight(1.0))
    rates = []
    for score in [1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]:  # better once, then patience 2 means the third stale epoch
        rates.append(plateau.lr)
        plateau.end_epoch(score)
    assert rates == [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.2]  # never below lr_min
    cosine = TrainingStep(vae, tiny_config(lr=1.0, lr_schedule="cosine", epochs=4, lr_min=0.0), KLWeight(1.0))
    rates = []
    with warnings.catch_warnings():  # no optimizer step between the schedule's steps here: torch says so
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(5):
            rates.append(cosine.lr)
            cosine.end_epoch(0.0)
    assert rates == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)),
                                   0.0], abs=1e-12)


def test_a_scheduled_run_resumes_to_the_same_result(digits, tmp_path):
    cfg = tiny_config(epochs=4, lr_schedule="cosine", lr_min=1e-4)
    straight = train(cfg, tmp_path / "straight", data=digits, progress=False)
    assert len({r["lr"] for r in straight.history}) > 1  # the schedule moved

    def interrupt(epoch, record):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", data=digits, progress=False, on_epoch_end=interrupt)
    resumed = resume(tmp_path / "cut", data=digits, progress=False)
    assert [(r["lr"], r["valid_elbo"]) for r in resumed.history] == [(r["lr"], r["valid_elbo"])
                                                                     for r in straight.history]


def test_pseudo_inputs_from_training_images_through_the_cli(tmp_path, capsys):
    tiny = ["--epochs", "1", "--hidden-dim", "16", "--hidden-layers", "1", "--quiet"]
    assert main(["train", "--prior", "vamp", "--prior-components", "5", "--prior-init", "data",
                 "--out", str(tmp_path / "v"), *tiny]) == 0
    assert main(["train", "--prior-init", "data", "--out", str(tmp_path / "n"), *tiny]) == 2
    assert "--prior-init data is defined for the vamp prior" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


# --------------------------------------------------------------------------- config files and recipes


def test_the_recipe_is_the_papers_setting():
    assert "vampprior-static-mnist" in recipes()
    recipe = read_config_file("recipes/vampprior-static-mnist.toml")
    config = Config.from_dict(recipe.fields).validate()
    assert (config.latent_dim, config.hidden_dim, config.hidden_layers, config.network) == (40, 300, 2, "gated-mlp")
    assert (config.prior, config.prior_components, config.lr, config.batch_size) == ("vamp", 500, 5e-4, 100)
    assert (config.warmup_epochs, config.patience, config.epochs, config.optimizer) == (100.0, 50, 2000,
                                                                                        "adam-normgrad")
    published = recipe.study.pop("published")
    assert recipe.study == {"priors": ["normal", "mog", "vamp"], "latent_dims": [40], "seeds": 1, "k": 5000,
                            "parameter_matched": "vamp"}
    assert (config.prior_weights, config.prior_reseed) == ("uniform", True)  # the mixture that stays a mixture
    assert (published["normal"], published["mog"], published["vamp"]) == (-88.56, -86.55, -85.57)
    assert published["setting"] == {"dataset": "binarized-mnist", "prior_components": 500, "k": 5000,
                                    "epochs": 2000, "test_points": 10000}
    assert "Tomczak & Welling (2018)" in published["source"]
    svae = read_config_file("svae-static-mnist")
    assert svae.study["priors"] == ["normal", "sphere"] and svae.study["latent_dims"] == [2, 5, 10, 20, 40]
    assert svae.study["published"]["sphere"]["2"] == -132.50 and svae.study["published"]["normal"]["40"] == -88.93
    assert svae.study["latent_dim_offsets"] == {"sphere": 1}  # S^d in R^(d+1), as the authors compare them


def test_a_config_file_round_trips_and_flags_override_it(tmp_path, digits):
    (tmp_path / "c.toml").write_text('latent_dim = 3\nhidden_dim = 16\nhidden_layers = 1\nepochs = 1\nlr = 2e-3\n'
                                     'prior = "laplace"\n')
    assert main(["train", "--config", str(tmp_path / "c.toml"), "--lr", "0.004", "--out", str(tmp_path / "a"),
                 "--quiet"]) == 0
    written = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (written["latent_dim"], written["prior"], written["lr"], written["hidden_dim"]) == (3, "laplace", 0.004, 16)
    # a run's config.json is a config file too: the same config again
    assert main(["train", "--config", str(tmp_path / "a" / "config.json"), "--out", str(tmp_path / "b"),
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text()) == written


def test_a_study_reads_its_options_from_the_config_file(tmp_path):
    (tmp_path / "s.toml").write_text('hidden_dim = 16\nhidden_layers = 1\nepochs = 1\n\n[study]\n'
                                     'priors = ["normal", "laplace"]\nlatent_dims = [2]\nk = 7\n\n'
                                     '[study.published]\nsource = "A. Paper (2020), Table 9"\nnormal = {2 = -99.25}\n'
                                     'laplace = -98.5\n')
    assert main(["compare", "--config", str(tmp_path / "s.toml"), "--priors", "normal", "--out",
                 str(tmp_path / "out"), "--quiet"]) == 0
    assert [p.name for p in (tmp_path / "out" / "runs").iterdir()] == ["normal-z2-s0"]  # the flag wins
    metrics = json.loads((tmp_path / "out" / "runs" / "normal-z2-s0" / "metrics.json").read_text())
    assert metrics["num_particles"] == 7  # the file's [study] k
    report = (tmp_path / "out" / "report.md").read_text()  # the paper's figure beside the study's own
    assert "Published figures beside ours: A. Paper (2020), Table 9" in report
    header, row = [line for line in report.splitlines() if line.startswith("| ")][:2]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    # the source states no setting, so its figure is not set beside ours as if it were comparable
    assert cells["published"] == "not comparable" and cells["epochs (best), s/epoch"].startswith("1/1 (best 1), ")
    assert "not comparable: the source's setting is not stated" in report
    assert json.loads((tmp_path / "out" / "study.json").read_text())["published"]["normal"] == {"2": -99.25}


@pytest.mark.parametrize("text,words", [
    ("latent_dim = ", "not a valid TOML file"), ("latent_size = 3", "unknown config fields: latent_size"),
    ('latent_dim = "three"', "latent_dim must be an integer"), ("lr = -1.0", "lr must be > 0"),
    ("[study]\npriors = []", "[study] priors must be a non-empty list"),
    ("[study]\ncolour = 1", "unknown [study] option 'colour'"),
    ("[study]\nlatent_dim_offsets = {sphere = -1}", "latent_dim_offsets must be a table of prior = whole number"),
    ("= = =", "not a valid TOML file"),
    ("[study.published]\nnormal = -88.5", "[study.published] needs a source"),
    ('[study.published]\nsource = "x"\nnormal = "high"', "[study.published] normal must be a finite number"),
    ('[study.published]\nsource = "x"\nnormal = {two = 1.0}', "latent sizes are whole numbers, got 'two'"),
])
def test_bad_config_files_are_one_line(text, words, tmp_path, capsys):
    (tmp_path / "bad.toml").write_text(text)
    for command in (["train", "--out", str(tmp_path / "r")], ["compare", "--out", str(tmp_path / "s")]):
        assert main([*command, "--config", str(tmp_path / "bad.toml"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0] and "bad.toml" in err[0], err
    assert main(["train", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- evaluation with K = 5000


def test_evaluation_batches_keep_memory_bounded_whatever_k_is(digits):
    vae = build_vae(tiny_config(prior="vamp", prior_components=500, latent_dim=40, hidden_dim=300), digits.dim,
                    digits.image_shape, digits.binary).eval()
    width = 300 + 500  # the widest layer and the mixture's components
    for k in (100, 1000, 5000):
        assert iw_batch_size(vae, k) == max(1, 20_000_000 // (k * width))
    torch.manual_seed(0)
    a = iw_log_likelihood(vae, digits.test[:3], num_particles=5000)
    torch.manual_seed(0)
    b = iw_log_likelihood(vae, digits.test[:3], num_particles=5000, batch_size=1)
    assert torch.isfinite(a).all() and torch.allclose(a, b, atol=0.5)  # other batches, other draws
