"""How many numbers a VAE of a given config holds and moves per training step, estimated before it is
built (:func:`check_model_fits`), so that a size that cannot fit is refused at once."""

from __future__ import annotations

from ..config import Config
from ..resources import check_fits


def _mlp(inputs: float, hidden: float, layers: float, outputs: float) -> float:
    return inputs * hidden + max(layers - 1, 0) * hidden * hidden + hidden * outputs


def parameter_count(config: Config, data_dim: int) -> float:
    """About how many parameters the model has (networks, guide flow, prior), as a float (it may be huge)."""
    d, h, layers = float(config.latent_dim), float(config.hidden_dim), float(config.hidden_layers)
    guide_out = {"full-covariance": d + d * (d + 1) / 2, "iaf": 2 * d + 16}.get(config.guide, 2 * d)
    count = _mlp(data_dim, h, layers, guide_out) + _mlp(d, float(config.decoder_hidden_dim or h), layers, data_dim)
    if config.guide == "iaf":  # conditional affine autoregressive layers: hidden width 10 d
        count += config.guide_flow_layers * (10 * d) * (d + 16 + 2 * d)
    prior = config.prior
    if prior in ("mog", "mog-enum"):
        count += config.prior_components * (2 * d + 1)
    elif prior == "vamp":
        count += config.prior_components * float(data_dim)
    elif prior == "flow":  # spline coupling / autoregressive layers: hidden widths 10 d
        count += config.prior_flow_layers * (10 * d) * (10 * d + 30 * d)
    return count


def step_numbers(config: Config, data_dim: int, batch: int) -> float:
    """About how many numbers one training step on ``batch`` data points holds: parameters with their
    gradients and Adam moments, and the activations of the batch's particles kept for the backward pass."""
    d, h, layers = float(config.latent_dim), float(config.hidden_dim), float(config.hidden_layers)
    rows = float(batch) * config.num_particles
    activations = rows * (2 * data_dim + 4 * h * layers + 4 * d)
    if config.prior in ("mog", "mog-enum", "vamp"):
        activations += rows * config.prior_components * (d + 1)
    return 4 * parameter_count(config, data_dim) + 3 * activations


def _sizes(config: Config, *names: str) -> str:
    relevant = ["latent_dim", "hidden_dim", "hidden_layers", *names]
    relevant += {"mog": ["prior_components"], "mog-enum": ["prior_components"], "vamp": ["prior_components"],
                 "flow": ["prior_flow_layers"]}.get(config.prior, [])
    relevant += ["guide_flow_layers"] if config.guide == "iaf" else []
    return ", ".join(f"{name}={getattr(config, name)}" for name in relevant)


def check_model_fits(config: Config, data_dim: int) -> None:
    """Refuse a config whose model (parameters, gradients, Adam's moments) cannot fit in its device's memory."""
    check_fits(f"the model ({_sizes(config)})", 4 * parameter_count(config, data_dim), config.device)


def check_step_fits(config: Config, data_dim: int, num_train: int) -> None:
    """Refuse a config whose training step (a batch, at most the training set, of particles) cannot fit."""
    batch = min(config.batch_size, num_train)
    check_fits(f"a training step ({_sizes(config, 'num_particles', 'batch_size')})",
               step_numbers(config, data_dim, batch), config.device)
