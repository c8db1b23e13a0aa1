"""Will it fit? Sizes that cannot fit in memory are refused before any work, with the size they need.

An estimate, not an accounting: it is meant to catch a latent size of 10^12 or a million flow layers
(which would otherwise hang, or be killed by the kernel after minutes), not to squeeze the last GiB.
"""

from __future__ import annotations

import os

from .errors import PyroVAEError

FLOAT_BYTES = 4


def available_bytes(device: str = "cpu") -> int:
    """Memory free for new tensors: the GPU's free memory for ``cuda``, else the system's available memory."""
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - neither Linux nor POSIX
        return 2**63


def human(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1024
    return f"{nbytes:.3g} PiB"  # pragma: no cover


def check_fits(what: str, numbers: float, device: str = "cpu", bytes_per_number: int = FLOAT_BYTES) -> None:
    """Refuse with a one-line :class:`PyroVAEError` when ``numbers`` floats would not fit in memory."""
    need = float(numbers) * bytes_per_number
    free = available_bytes(device)
    if need > free:
        raise PyroVAEError(f"{what} needs about {human(need)} of memory, more than the {human(free)} available")
