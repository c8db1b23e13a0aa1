"""Encoder and decoder networks. All accept any number of leading batch dimensions."""

from __future__ import annotations

import torch
from torch import nn


def mlp(in_dim: int, hidden_dim: int, hidden_layers: int, out_dim: int) -> nn.Sequential:
    """in_dim -> [Linear, Softplus] x hidden_layers -> Linear -> out_dim."""
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(hidden_layers):
        layers += [nn.Linear(width, hidden_dim), nn.Softplus()]
        width = hidden_dim
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class GatedDense(nn.Module):
    """h = (W1 x + b1) * sigmoid(W2 x + b2): the gated dense layer of the VampPrior code (Tomczak &
    Welling 2018, ``utils/nn.py`` ``GatedDense``; after Dauphin et al. 2017's gated linear units)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.h = nn.Linear(in_dim, out_dim)
        self.g = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


def he_init(module: nn.Module) -> nn.Module:
    """Weights of every Linear ~ N(0, 2 / fan_in), biases as PyTorch leaves them: the VampPrior code's
    ``he_init`` (``utils/nn.py``), applied there to every ``nn.Linear``."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, (2.0 / m.in_features) ** 0.5)
    return module


def gated_mlp(in_dim: int, hidden_dim: int, hidden_layers: int, out_dim: int) -> nn.Sequential:
    """in_dim -> GatedDense x hidden_layers -> Linear -> out_dim, He-initialised: the encoder and decoder
    of the VampPrior paper's one-layer VAE (2 x 300 gated units) when hidden_layers=2, hidden_dim=300."""
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(hidden_layers):
        layers.append(GatedDense(width, hidden_dim))
        width = hidden_dim
    layers.append(nn.Linear(width, out_dim))
    return he_init(nn.Sequential(*layers))


class ConvEncoder(nn.Module):
    """28x28 image -> out_dim, through two stride-2 convolutions (28 -> 14 -> 7)."""

    def __init__(self, out_dim: int, hidden_dim: int = 256, channels: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(2 * channels * 7 * 7, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return self.net(x.reshape(-1, 1, 28, 28)).reshape(*lead, -1)


class ConvDecoder(nn.Module):
    """latent -> 784 pixel parameters, mirroring :class:`ConvEncoder` with transposed convolutions."""

    def __init__(self, latent_dim: int, hidden_dim: int = 256, channels: int = 32):
        super().__init__()
        self.channels = channels
        self.fc = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 2 * channels * 7 * 7), nn.SiLU()
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(2 * channels, channels, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.ConvTranspose2d(channels, 1, 4, stride=2, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        h = self.fc(z.reshape(-1, z.shape[-1])).reshape(-1, 2 * self.channels, 7, 7)
        return self.deconv(h).reshape(*lead, 784)


NETWORKS = ("mlp", "gated-mlp", "conv")
"""The network kinds ``--network`` names."""


def build_networks(kind: str, data_dim: int, image_shape, latent_dim: int, hidden_dim: int, hidden_layers: int,
                   encoder_out: int, decoder_out: int, decoder_hidden_dim: int | None = None
                   ) -> tuple[nn.Module, nn.Module]:
    """The (encoder, decoder) pair: encoder maps x (D) to ``encoder_out`` numbers, decoder z to ``decoder_out``;
    the decoder's hidden layers ``decoder_hidden_dim`` wide (default ``hidden_dim``)."""
    wide = decoder_hidden_dim or hidden_dim
    if kind in ("mlp", "gated-mlp"):
        make = mlp if kind == "mlp" else gated_mlp
        return (make(data_dim, hidden_dim, hidden_layers, encoder_out),
                make(latent_dim, wide, hidden_layers, decoder_out))
    if kind == "conv":
        from ..errors import PyroVAEError

        if tuple(image_shape) != (28, 28) or decoder_out != 784:
            raise PyroVAEError(f"the conv network needs 28x28 images, got {tuple(image_shape)}")
        return ConvEncoder(encoder_out, hidden_dim), ConvDecoder(latent_dim, wide)
    from ..errors import PyroVAEError

    raise PyroVAEError(f"unknown network {kind!r}; choose one of {', '.join(NETWORKS)}")
