"""Sample quality for labelled datasets, measured in the feature space of a reference classifier.

The classifier (an MLP, trained once per dataset and cached) gives, for generated images:
    Frechet distance   ||mu_g - mu_r||^2 + tr(C_g + C_r - 2 (C_g C_r)^(1/2))   between Gaussians fitted
                       to penultimate-layer features of generated and real test images (lower is better)
    confidence         mean max softmax probability (garbage decodes to low confidence)
    class entropy      entropy of the predicted-class histogram (log 10 = every class equally often)
"""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch import nn

from ..data import Dataset, default_data_root
from ..run_dir import atomic_write_bytes
from ..seeding import seeded


class ReferenceClassifier(nn.Module):
    """D -> 256 -> 128 (features) -> classes."""

    def __init__(self, data_dim: int, classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(data_dim, 256), nn.SiLU(), nn.Linear(256, 128), nn.SiLU())
        self.head = nn.Linear(128, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _fingerprint(data: Dataset) -> str:
    h = hashlib.sha1(data.name.encode())
    h.update(data.train.numpy().tobytes())
    h.update(data.train_labels.numpy().tobytes())
    return h.hexdigest()[:16]


def reference_classifier(data: Dataset, cache_dir: str | Path | None = None, seed: int = 0,
                         progress: bool = False) -> tuple[ReferenceClassifier, float]:
    """The dataset's reference classifier and its test accuracy, trained once and cached in
    ``cache_dir`` (default ``$PYRO_VAE_DATA/classifiers``) under the dataset's fingerprint."""
    if data.train_labels is None:
        raise ValueError(f"{data.name} has no labels: no reference classifier")
    classes = int(data.train_labels.max()) + 1
    cache_dir = Path(cache_dir) if cache_dir else default_data_root() / "classifiers"
    path = cache_dir / f"{Path(data.name).stem}-{_fingerprint(data)}.pt"
    clf = ReferenceClassifier(data.dim, classes)
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        clf.load_state_dict(saved["state"])
        return clf.eval(), float(saved["test_accuracy"])
    with seeded(seed):
        _fit_classifier(clf, data, progress)
    clf.eval()
    with torch.no_grad():
        accuracy = (clf(data.test).argmax(-1) == data.test_labels).double().mean().item()
    buffer = io.BytesIO()
    torch.save({"state": clf.state_dict(), "test_accuracy": accuracy}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return clf, accuracy


def _fit_classifier(clf: ReferenceClassifier, data: Dataset, progress: bool) -> None:
    from .tracking import bar as _bar

    x, y = data.train, data.train_labels
    epochs = max(3, min(40, 100_000 // len(x)))
    optim = torch.optim.Adam(clf.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in _bar(range(epochs), desc="reference classifier", enabled=progress):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = perm[i : i + 128]
            # light pixel noise makes the classifier judge grey-level and binary images alike
            xb = (x[idx] + 0.1 * torch.randn_like(x[idx])).clamp(0, 1)
            loss = nn.functional.cross_entropy(clf(xb), y[idx])
            optim.zero_grad()
            loss.backward()
            optim.step()


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """The Frechet distance between Gaussians fitted to two feature sets (as in FID)."""
    a, b = features_a.double().numpy(), features_b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


@torch.no_grad()
def sample_quality(clf: ReferenceClassifier, samples: torch.Tensor, real: torch.Tensor) -> dict:
    """Frechet distance to real images, mean confidence, and predicted-class entropy of ``samples``."""
    samples, real = samples.cpu().float(), real.cpu().float()
    probs = torch.softmax(clf(samples), -1)
    histogram = torch.bincount(probs.argmax(-1), minlength=probs.shape[-1]).double() / len(samples)
    nonzero = histogram[histogram > 0]
    return {
        "frechet_distance": frechet_distance(clf.features(samples), clf.features(real)),
        "confidence": probs.max(-1).values.mean().item(),
        "class_entropy": float(-(nonzero * nonzero.log()).sum()),
        "class_entropy_max": math.log(probs.shape[-1]),
    }
