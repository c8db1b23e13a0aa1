"""The one typed object that describes a run.

Every field maps one to one onto a ``pyro-vae train`` flag (``latent_dim`` -> ``--latent-dim``),
and the object round-trips through ``config.json``, so a run can be rebuilt from its directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import PyroVAEError

LIKELIHOODS = ("auto", "bernoulli", "continuous-bernoulli", "gaussian")
NETWORKS = ("mlp", "gated-mlp", "conv")
GUIDE_SCALES = ("softplus", "bounded-logvar")
SCHEDULES = ("constant", "plateau", "cosine")
PRIOR_INITS = ("random", "data")
PRIOR_WEIGHTS = ("learned", "uniform")
OPTIMIZERS = ("adam", "adam-normgrad")
LOGS = ("none", "csv", "tensorboard", "mlflow")
OBJECTIVES = ("trace", "analytic", "iwae")
ELBOS = ("direct", "pyro")
DEVICES = ("cpu", "cuda")
FLOWS = ("spline-coupling", "affine-autoregressive")
GUIDES = ("auto", "normal", "full-covariance", "iaf", "sphere", "projected-normal", "relaxed-categorical")
SEED_LIMIT = 2**32
PRIOR_REFERENCE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
"""``module:attribute``, the way to name a prior of your own (``--prior my_priors:cauchy``)."""


def _opt(help: str, choices: tuple[str, ...] | None = None, **kw: Any) -> Any:
    return field(metadata={"help": help, "choices": choices}, **kw)


@dataclass
class Config:
    """Everything needed to train a VAE and rebuild it later."""

    # data
    dataset: str = _opt(
        "digits (scikit-learn 8x8, embedded), binarized-mnist, fashion-mnist, "
        "or the path of a .npy/.pt file of images in [0, 1] or 0..255",
        default="digits",
    )
    data_root: str | None = _opt(
        "folder holding the dataset's files (binarized-mnist: .amat or .mat; fashion-mnist: IDX)",
        default=None,
    )
    download: bool = _opt("download the dataset's canonical files if they are missing", default=False)
    binarize: bool = _opt("dynamic binarization: resample x ~ Bernoulli(pixel) every batch", default=False)
    # model
    latent_dim: int = _opt("size of the latent z", default=2)
    prior: str = _opt(
        "the prior p(z): normal, learned-normal, laplace, student-t, logistic, uniform, mog, mog-enum, vamp, "
        "flow, sphere, power-spherical, vmf, projected-normal, dirichlet, relaxed-categorical, or module:attribute "
        "for your own",
        default="normal",
    )
    prior_scale: float = _opt("laplace, logistic, uniform: standard deviation per coordinate; student-t: scale",
                              default=1.0)
    prior_df: float = _opt("student-t: degrees of freedom", default=3.0)
    prior_components: int = _opt("mog, mog-enum: components K; vamp: pseudo-inputs K", default=10)
    prior_learnable: bool = _opt("mog, mog-enum: learn the means and scales (and the weights, see --prior-weights); "
                                 "else all fixed", default=True)
    prior_weights: str = _opt("mog, mog-enum: the mixture weights learned (softmax of logits) or uniform, fixed at "
                              "1/K (the VampPrior authors' code's mixture priors)", choices=PRIOR_WEIGHTS,
                              default="learned")
    prior_reseed: bool = _opt("mog, mog-enum: after each epoch, a component used by fewer than a tenth of its "
                              "uniform share of 5,000 random training codes is re-seeded at the posterior "
                              "q(z|x) of a random training image", default=False)
    prior_flow: str = _opt("flow: the transforms", choices=FLOWS, default="spline-coupling")
    prior_flow_layers: int = _opt("flow: number of flow layers", default=2)
    prior_concentration: float = _opt("power-spherical, vmf, projected-normal: kappa; dirichlet: alpha", default=1.0)
    prior_temperature: float = _opt("relaxed-categorical: temperature tau", default=0.5)
    prior_args: dict = _opt("a prior of your own: keyword arguments after latent_dim (--prior-arg name=value, "
                            "repeatable)", default_factory=dict)
    prior_path: str | None = _opt("a prior of your own: the folder its module is imported from (recorded at "
                                  "training: where the module was found)", default=None)
    prior_init: str = _opt("vamp: pseudo-inputs start as random near-black images (pixels ~ N(0.05, 0.01^2), the "
                           "VampPrior code's), or (data) as training images plus noise of sd 0.01 (its "
                           "use_training_data_init)", choices=PRIOR_INITS, default="random")
    guide: str = _opt(
        "q(z|x): auto follows the prior's support (normal through biject_to; sphere: the power spherical, any d; "
        "projected-normal, d <= 4; relaxed-categorical); "
        "full-covariance and iaf (inverse autoregressive flow) are richer",
        choices=GUIDES,
        default="auto",
    )
    guide_flow_layers: int = _opt("iaf guide: number of autoregressive layers", default=2)
    guide_scale: str = _opt("normal guide's scale from the encoder: softplus (1e-4 + softplus(h)), or "
                            "bounded-logvar (log-variance hardtanh(h, -6, 2), as the VampPrior code)",
                            choices=GUIDE_SCALES, default="softplus")
    likelihood: str = _opt(
        "p(x|z); auto = bernoulli for binary data, continuous-bernoulli for grey levels",
        choices=LIKELIHOODS,
        default="auto",
    )
    network: str = _opt("encoder/decoder networks: mlp (softplus), gated-mlp (h = (W1 x + b1) * sigmoid(W2 x + b2), "
                        "He-initialised, as the VampPrior code), conv (28x28 images)", choices=NETWORKS, default="mlp")
    hidden_dim: int = _opt("width of the hidden layers", default=256)
    decoder_hidden_dim: int = _opt("width of the decoder's hidden layers (0: hidden_dim); widening the decoder of "
                                   "an N(0, I) run to a learned prior's parameter count is the parameter-matched "
                                   "control", default=0)
    hidden_layers: int = _opt("number of hidden layers in the MLPs", default=2)
    # objective
    objective: str = _opt(
        "trace = Trace_ELBO (Monte Carlo), analytic = TraceMeanField_ELBO (analytic KL), "
        "iwae = RenyiELBO(alpha=0), the importance-weighted bound",
        choices=OBJECTIVES,
        default="trace",
    )
    num_particles: int = _opt("samples of z per data point in the objective (K for iwae)", default=1)
    beta: float = _opt("weight of the KL term (1 = the ELBO, 0 = an autoencoder)", default=1.0)
    warmup_epochs: float = _opt("linear KL warm-up: beta rises from 0 over this many epochs", default=0.0)
    elbo: str = _opt("how the ELBO is computed: direct (from the model's and guide's distributions in tensor "
                     "arithmetic, the same estimator as Pyro's on the same noise; where it does not apply, Pyro's), "
                     "or pyro (Trace_ELBO, TraceMeanField_ELBO, RenyiELBO, TraceEnum_ELBO)", choices=ELBOS,
                     default="direct")
    jit: bool = _opt("compile the ELBO where it applies and repays its compilation, with a built-in prior other "
                     "than flow and vmf: the direct ELBO with torch.compile for runs of at least 30,000 training "
                     "steps; Pyro's with torch.jit (JitTrace_ELBO and friends) for the trace and analytic "
                     "objectives; --no-jit never compiles", default=True)
    # optimisation
    epochs: int = _opt("maximum number of epochs", default=100)
    batch_size: int = _opt("mini-batch size", default=128)
    optimizer: str = _opt("adam (torch.optim.Adam over all parameters), or adam-normgrad (each parameter's "
                          "gradient divided by its L2 norm first, as the VampPrior code's AdamNormGrad)",
                          choices=OPTIMIZERS, default="adam")
    lr: float = _opt("Adam learning rate", default=1e-3)
    lr_schedule: str = _opt("learning rate: constant; plateau (times lr_factor after lr_patience epochs without a "
                            "better validation score); cosine (annealed to lr_min over the epochs)",
                            choices=SCHEDULES, default="constant")
    lr_patience: int = _opt("plateau: epochs without improvement before the rate drops", default=10)
    lr_factor: float = _opt("plateau: the factor the rate is multiplied by", default=0.5)
    lr_min: float = _opt("plateau, cosine: the lowest rate", default=0.0)
    clip_norm: float = _opt("gradient clamping (as Pyro's ClippedAdam): each gradient element clamped to "
                            "[-clip_norm, clip_norm]; 0 = none", default=10.0)
    patience: int = _opt("early stopping: epochs without a better validation ELBO (0 = never stop); not counted "
                         "during KL warm-up", default=20)
    seed: int = _opt("random seed (model initialisation, batches, Monte Carlo)", default=0)
    device: str = _opt("where to train", choices=DEVICES, default="cpu")
    log: str = _opt("per-epoch metrics also to: metrics.csv, TensorBoard (RUN/tensorboard) or MLflow "
                    "($MLFLOW_TRACKING_URI, else RUN/mlruns); the last two need pyro-vae[tracking]",
                    choices=LOGS, default="none")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # Config(lr=1) means lr=1.0
            value = getattr(self, f.name)
            if f.type in (float, "float") and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))

    def validate(self) -> "Config":
        """Raise PyroVAEError naming the first field of the wrong type or out of range."""
        self._check_types()
        for name in ("latent_dim", "hidden_dim", "hidden_layers", "num_particles", "epochs", "batch_size",
                     "prior_components", "prior_flow_layers", "guide_flow_layers"):
            if getattr(self, name) < 1:
                raise PyroVAEError(f"{name} must be >= 1, got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise PyroVAEError(f"{f.name} must be a finite number, got {value}")
        for key, value in self.prior_args.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise PyroVAEError(f"prior_args {key} must be a finite number, got {value}")
        for name in ("lr", "prior_scale", "prior_df", "prior_concentration", "prior_temperature"):
            if not getattr(self, name) > 0:
                raise PyroVAEError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.decoder_hidden_dim < 0:
            raise PyroVAEError(f"decoder_hidden_dim must be >= 0 (0: hidden_dim), got {self.decoder_hidden_dim}")
        if not self.beta >= 0:
            raise PyroVAEError(f"beta must be >= 0, got {self.beta}")
        for name in ("clip_norm", "lr_min", "lr_patience"):
            if not getattr(self, name) >= 0:
                raise PyroVAEError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.lr_factor < 1:
            raise PyroVAEError(f"lr_factor must lie in (0, 1), got {self.lr_factor}")
        if not self.warmup_epochs >= 0 or self.patience < 0:
            raise PyroVAEError("warmup_epochs and patience must be >= 0")
        if not 0 <= self.seed < SEED_LIMIT:
            raise PyroVAEError(f"seed must lie in [0, 2^32), got {self.seed}")
        if ":" in self.prior and self.prior != "<object>" and not PRIOR_REFERENCE.fullmatch(self.prior):
            raise PyroVAEError(f"prior {self.prior!r} is neither a built-in name nor module:attribute "
                               "(e.g. my_priors:cauchy)")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise PyroVAEError(
                    f"unknown {f.name} {getattr(self, f.name)!r}; choose one of {', '.join(choices)}"
                )
        return self

    def _check_types(self) -> None:
        for name, kind in typing.get_type_hints(type(self)).items():
            value = getattr(self, name)
            if not _has_type(value, kind):
                raise PyroVAEError(f"{name} must be {_describe_type(kind)}, got {type(value).__name__} {value!r:.60}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # a deep copy: prior_args is not shared

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        """A Config from a mapping of field names (as in config.json): unknown fields and values of the
        wrong type are refused (whole numbers are accepted for float fields); ranges are :meth:`validate`'s."""
        if not isinstance(d, dict):
            raise PyroVAEError(f"a config must be a mapping of field names to values, got {type(d).__name__}")
        hints = typing.get_type_hints(cls)
        unknown = sorted(str(k) for k in set(d) - set(hints))
        if unknown:
            raise PyroVAEError(f"unknown config fields: {', '.join(unknown)}")
        values = {}
        for name, value in d.items():
            if hints[name] is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not _has_type(value, hints[name]):
                raise PyroVAEError(f"{name} must be {_describe_type(hints[name])}, got {type(value).__name__} "
                                   f"{value!r:.60}")
            values[name] = value
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        try:
            d = json.loads(text)
        except ValueError as e:
            raise PyroVAEError(f"not valid JSON ({e})") from None
        return cls.from_dict(d)


def _has_type(value, kind) -> bool:
    """Whether ``value`` is of the field type ``kind`` (int, float, bool, str, X | None, or dict of names to
    numbers, strings and booleans); bools are not numbers here."""
    if kind is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, (bool, int, float, str))
                                               for k, v in value.items())
    if typing.get_origin(kind) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_has_type(value, k) for k in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if kind in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, kind)


def _describe_type(kind) -> str:
    args = typing.get_args(kind)
    if args:
        return " or ".join(_describe_type(k) for k in args)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null", dict: "a table of names to numbers, strings or booleans"}.get(kind, str(kind))


def add_config_flags(parser, hidden: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field of :class:`Config` on an argparse parser, in a group of its own; a flag not
    given leaves the field out of the namespace (so a config file's value stands). Fields in ``hidden`` are
    parsed but not listed by --help (a study sets them per setting and refuses them by name)."""
    import argparse

    hints = typing.get_type_hints(Config)
    defaults = Config()
    group = parser.add_argument_group("run configuration (stored in config.json)")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        default = getattr(defaults, f.name)
        help_text = argparse.SUPPRESS if f.name in hidden else f"{f.metadata['help']} (default: {default})"
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if kind is dict:  # --prior-arg name=value, repeatable
            group.add_argument("--prior-arg", flag, action="append", type=name_value, metavar="NAME=VALUE", **kw)
            continue
        if kind in (int, float):
            kw["type"] = kind
        kw["metavar"] = f.name.upper()
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
            kw.pop("metavar")
        group.add_argument(flag, **kw)


def name_value(text: str) -> tuple[str, object]:
    """NAME=VALUE (``--prior-arg``), VALUE read as JSON where it is a number or a boolean, else kept as a
    string."""
    import argparse
    import json

    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return name, parsed if isinstance(parsed, (bool, int, float, str)) else value
