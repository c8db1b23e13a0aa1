"""The settings of a study: one :class:`Setting` (a name, a config, its label) per run.

    compare     one run per (prior, latent size, seed): what the prior changes
    sweep-beta  one run per (beta, latent size, seed): beta = 0 is the autoencoder without the KL pull
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import Config
from ..errors import PyroVAEError
from ..models.priors import PRIORS
from ..run_dir import RunFiles


@dataclasses.dataclass
class Setting:
    """One cell of a study: a name, the config that trains it, and its labels in the report."""

    name: str
    config: Config
    label: str          # the prior or the beta
    latent_dim: int     # the size compared: config.latent_dim less the prior's offset (see compare_settings)
    seed: int


def compare_settings(base: Config, priors: list[str], latent_dims: list[int], seeds: int,
                     offsets: dict[str, int] | None = None) -> list[Setting]:
    """One setting per (latent size d, prior, seed). ``offsets``: prior -> n, whose runs get latent_dim d + n
    and are compared at size d: the hyperspherical VAE's S^d lives in R^(d+1) (Davidson et al. 2018 compare
    the N-VAE in R^d with the S-VAE on S^d, a d-dimensional manifold: their code's z_dim + 1), so a sphere
    prior compared at d takes ``{sphere = 1}``."""
    unknown = [p for p in priors if p not in PRIORS and ":" not in p]
    if unknown:
        raise PyroVAEError(f"unknown priors {', '.join(unknown)}; choose from {', '.join(PRIORS)}")
    offsets = dict(offsets or {})
    stray = [p for p in offsets if p not in PRIORS and ":" not in p]  # a prior this study leaves out: no matter
    if stray:
        raise PyroVAEError(f"latent_dim_offsets names unknown priors {', '.join(stray)}; choose from {', '.join(PRIORS)}")
    bad = {p: n for p, n in offsets.items() if not isinstance(n, int) or isinstance(n, bool) or n < 0}
    if bad:
        raise PyroVAEError(f"latent_dim_offsets must be whole numbers >= 0, got {bad}")
    return [Setting(f"{p.replace(':', '_')}-z{d}-s{s}",
                    dataclasses.replace(base, prior=p, latent_dim=d + offsets.get(p, 0), seed=base.seed + s), p, d, s)
            for d in latent_dims for p in priors for s in range(seeds)]


def beta_settings(base: Config, betas: list[float], latent_dims: list[int], seeds: int) -> list[Setting]:
    if any(not b >= 0 for b in betas):
        raise PyroVAEError(f"every beta must be >= 0, got {betas}")
    return [Setting(f"beta{b:g}-z{d}-s{s}", dataclasses.replace(base, beta=b, latent_dim=d, seed=base.seed + s),
                    f"{b:g}", d, s)
            for d in latent_dims for b in betas for s in range(seeds)]


def stale_fields(out: Path, setting: Setting) -> list[str]:
    """The config fields in which a run already in the study differs from its setting ([] if none, or if
    there is no run yet)."""
    files = RunFiles(out / "runs" / setting.name)
    if not (files / "config.json").is_file():
        return []
    try:
        stored = files.read_config().to_dict()
    except PyroVAEError:
        return ["config.json unreadable"]
    wanted = setting.config.to_dict()
    if wanted["prior_path"] is None and ":" in wanted["prior"]:
        # training records the folder the module was imported from: it must be the folder the caller's
        # own import finds now (check_settings has imported it), or the run would be trusted with another
        from ..models.user_priors import module_folder

        wanted["prior_path"] = module_folder(wanted["prior"])
    elif wanted["prior_path"] is None:
        wanted["prior_path"] = stored["prior_path"]
    return [f"{k}={stored[k]!r} (wanted {wanted[k]!r})" for k in wanted if stored[k] != wanted[k]]
