import dataclasses
from pathlib import Path

import pyro
import pytest
import torch

from pyro_vae import Config, load_dataset

SHARED_BINARIZED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "binarized_mnist"


@pytest.fixture(autouse=True, scope="session")
def private_data_root(tmp_path_factory):
    """Caches the tests write (reference classifiers) go to a temporary folder, not the user's home."""
    import os

    old = os.environ.get("PYRO_VAE_DATA")
    os.environ["PYRO_VAE_DATA"] = str(tmp_path_factory.mktemp("data_root"))
    yield
    if old is None:
        os.environ.pop("PYRO_VAE_DATA")
    else:
        os.environ["PYRO_VAE_DATA"] = old


@pytest.fixture(autouse=True)
def pyro_validation():
    """Pyro's own checks (distribution arguments, model/guide site agreement) are on in every test."""
    pyro.enable_validation(True)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


def tiny_config(**overrides) -> Config:
    """A small, fast VAE on the digits: a few seconds per run on 2 cores."""
    base = Config(hidden_dim=64, hidden_layers=1, epochs=4, batch_size=128, lr=3e-3, patience=0)
    return dataclasses.replace(base, **overrides)


@pytest.fixture
def tiny():
    return tiny_config


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()
