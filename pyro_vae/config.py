"""The one typed object that describes a run.

Every field maps one to one onto a ``pyro-vae train`` flag (``latent_dim`` -> ``--latent-dim``),
and the object round-trips through ``config.json``, so a run can be rebuilt from its directory.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import PyroVAEError

LIKELIHOODS = ("auto", "bernoulli", "continuous-bernoulli", "gaussian")
NETWORKS = ("mlp", "conv")
OBJECTIVES = ("trace", "analytic", "iwae")
DEVICES = ("cpu", "cuda")
FLOWS = ("spline-coupling", "affine-autoregressive")
GUIDES = ("auto", "normal", "full-covariance", "iaf", "sphere", "relaxed-categorical")


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
        "flow, sphere, projected-normal, dirichlet, relaxed-categorical, or module:attribute for your own",
        default="normal",
    )
    prior_scale: float = _opt("laplace, logistic, uniform: standard deviation per coordinate; student-t: scale",
                              default=1.0)
    prior_df: float = _opt("student-t: degrees of freedom", default=3.0)
    prior_components: int = _opt("mog, mog-enum: components K; vamp: pseudo-inputs K", default=10)
    prior_learnable: bool = _opt("mog, mog-enum: learn weights, means and scales (else fixed)", default=True)
    prior_flow: str = _opt("flow: the transforms", choices=FLOWS, default="spline-coupling")
    prior_flow_layers: int = _opt("flow: number of flow layers", default=2)
    prior_concentration: float = _opt("projected-normal: kappa; dirichlet: alpha", default=1.0)
    prior_temperature: float = _opt("relaxed-categorical: temperature tau", default=0.5)
    guide: str = _opt(
        "q(z|x): auto follows the prior's support (normal through biject_to; sphere; relaxed-categorical); "
        "full-covariance and iaf (inverse autoregressive flow) are richer",
        choices=GUIDES,
        default="auto",
    )
    guide_flow_layers: int = _opt("iaf guide: number of autoregressive layers", default=2)
    likelihood: str = _opt(
        "p(x|z); auto = bernoulli for binary data, continuous-bernoulli for grey levels",
        choices=LIKELIHOODS,
        default="auto",
    )
    network: str = _opt("encoder/decoder networks (conv needs 28x28 images)", choices=NETWORKS, default="mlp")
    hidden_dim: int = _opt("width of the hidden layers", default=256)
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
    jit: bool = _opt("compile the ELBO with torch.jit (JitTrace_ELBO and friends) where it applies: the trace "
                     "and analytic objectives with a built-in prior other than flow; --no-jit never compiles",
                     default=True)
    # optimisation
    epochs: int = _opt("maximum number of epochs", default=100)
    batch_size: int = _opt("mini-batch size", default=128)
    lr: float = _opt("Adam learning rate", default=1e-3)
    clip_norm: float = _opt("gradient clipping (ClippedAdam): each gradient element clamped to "
                            "[-clip_norm, clip_norm]", default=10.0)
    patience: int = _opt("early stopping: epochs without a better validation ELBO (0 = never stop)", default=20)
    seed: int = _opt("random seed (model initialisation, batches, Monte Carlo)", default=0)
    device: str = _opt("where to train", choices=DEVICES, default="cpu")

    def validate(self) -> "Config":
        """Raise PyroVAEError naming the first field that is out of range."""
        if self.latent_dim < 1:
            raise PyroVAEError(f"latent_dim must be >= 1, got {self.latent_dim}")
        for name in ("hidden_dim", "hidden_layers", "num_particles", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise PyroVAEError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("prior_components", "prior_flow_layers", "guide_flow_layers"):
            if getattr(self, name) < 1:
                raise PyroVAEError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "clip_norm", "prior_scale", "prior_df", "prior_concentration", "prior_temperature"):
            if not getattr(self, name) > 0:
                raise PyroVAEError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.beta >= 0:
            raise PyroVAEError(f"beta must be >= 0, got {self.beta}")
        if not self.warmup_epochs >= 0 or self.patience < 0:
            raise PyroVAEError("warmup_epochs and patience must be >= 0")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise PyroVAEError(
                    f"unknown {f.name} {getattr(self, f.name)!r}; choose one of {', '.join(choices)}"
                )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise PyroVAEError(f"unknown config fields: {', '.join(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return cls.from_dict(json.loads(text))
