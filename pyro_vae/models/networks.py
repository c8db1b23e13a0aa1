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


NETWORKS = ("mlp", "conv")
"""The network kinds ``--network`` names."""


def build_networks(kind: str, data_dim: int, image_shape, latent_dim: int, hidden_dim: int, hidden_layers: int,
                   encoder_out: int, decoder_out: int) -> tuple[nn.Module, nn.Module]:
    """The (encoder, decoder) pair: encoder maps x (D) to ``encoder_out`` numbers, decoder z to ``decoder_out``."""
    if kind == "mlp":
        return (mlp(data_dim, hidden_dim, hidden_layers, encoder_out),
                mlp(latent_dim, hidden_dim, hidden_layers, decoder_out))
    if kind == "conv":
        from ..errors import PyroVAEError

        if tuple(image_shape) != (28, 28) or decoder_out != 784:
            raise PyroVAEError(f"the conv network needs 28x28 images, got {tuple(image_shape)}")
        return ConvEncoder(encoder_out, hidden_dim), ConvDecoder(latent_dim, hidden_dim)
    from ..errors import PyroVAEError

    raise PyroVAEError(f"unknown network {kind!r}; choose mlp or conv")
