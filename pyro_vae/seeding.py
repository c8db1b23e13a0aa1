"""Private random streams: draw reproducibly without moving the global (training) stream."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu"):
    """Draw from a private random stream seeded with ``seed``, on the CPU and on ``device`` if it is a
    GPU; the global streams are left where they were."""
    device = torch.device(device)
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
