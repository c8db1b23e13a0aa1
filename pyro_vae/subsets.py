"""Subsets of a split: seeded and random, never a prefix, and recorded where they are used.

A dataset file may be sorted: the static binarized MNIST test file is in class order (its first 2,000
images are 0s and 1s; mean log p(x) of a trained N(0, I) VAE is -72.8 nats over them against -88.5 over
all 10,000), so "the first N points" describes a few classes, not the split. Every consumer that looks at
fewer than all points of a split (an aggregate posterior, a sharpness reference, figures, the images a
command reconstructs) takes them through :func:`random_subset`, and writes :meth:`Subset.record` beside
what it measured, so that a reader can redraw the same points.

The draw is ``torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]``: on the CPU, the
same on every machine and device, and nested (the subset of n is the first n of the subset of m > n).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import PyroVAEError


@dataclass(frozen=True)
class Subset:
    """Which points of a split of ``of`` points were taken: ``indices`` (into the split), from ``seed``."""

    indices: torch.Tensor
    of: int
    seed: int | None  # None: the whole split, in its own order

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def whole(self) -> bool:
        return self.seed is None

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The chosen rows of ``x`` (a tensor of the split's ``of`` rows), on ``x``'s device."""
        if len(x) != self.of:
            raise ValueError(f"a subset of {self.of} points taken from {len(x)} rows")
        return x if self.whole else x[self.indices.to(x.device)]

    def record(self) -> dict:
        """What metrics.json and reports say about the subset: its size, the split's, and the seed."""
        return {"n": len(self), "of": self.of, "seed": self.seed,
                "rule": "whole split" if self.whole else "random without replacement: torch.randperm(of, "
                "generator=torch.Generator().manual_seed(seed))[:n]"}


def random_subset(total: int, n: int | None, seed: int) -> Subset:
    """``n`` points of a split of ``total``, drawn at random without replacement from ``seed``; the whole
    split (in its order) when ``n`` is None or at least ``total``."""
    if n is not None and n < 1:
        raise PyroVAEError(f"a subset needs at least one point, got {n}")
    if n is None or n >= total:
        return Subset(torch.arange(total), total, None)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(int(seed)))
    return Subset(order[:n], total, int(seed))


def describe(record: dict) -> str:
    """A subset's record in words, for tables and figure titles."""
    if record.get("seed") is None:
        return f"all {record['of']}"
    return f"{record['n']} of {record['of']} at random (seed {record['seed']})"


def parse_indices(text: str, total: int) -> torch.Tensor:
    """``--indices 0,5,17``: whole numbers within the split, refused by name otherwise."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PyroVAEError(f"--indices must be comma-separated whole numbers, got {text!r}") from None
    bad = [v for v in values if not 0 <= v < total]
    if not values or bad:
        raise PyroVAEError(f"--indices must name images 0..{total - 1} of the split, got {text!r}")
    return torch.tensor(values)
