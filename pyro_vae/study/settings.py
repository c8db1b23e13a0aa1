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


def parameter_matched_settings(settings: list[Setting], matched: str, data_dim: int | None = None,
                               image_shape=None) -> list[Setting]:
    """The control a reviewer asks for: beside each setting of prior ``matched`` (say the VampPrior, whose
    K pseudo-inputs add K x D parameters), an N(0, I) run of the same config whose decoder's hidden layers
    are widened (``decoder_hidden_dim``) to the narrowest width at which its parameter count reaches the
    ``matched`` run's. If the N(0, I) run with the wide decoder still trails the learned prior, the prior
    and not the extra parameters made the difference. Named ``normal-wide-z<d>-s<seed>``."""
    from ..models.vae import build_vae

    if data_dim is None:  # the data's size, from the settings' dataset
        from ..data import load_dataset

        first = settings[0].config
        data = load_dataset(first.dataset, first.data_root, download=first.download)
        data_dim, image_shape = data.dim, data.image_shape

    def total(config: Config) -> int:
        return sum(p.numel() for p in build_vae(config, data_dim, image_shape, True).parameters())

    out = []
    for s in settings:
        if s.label != matched:
            continue
        base = dataclasses.replace(s.config, prior="normal")
        target = total(s.config)
        low, high = base.hidden_dim, base.hidden_dim
        while total(dataclasses.replace(base, decoder_hidden_dim=high)) < target:
            low, high = high, 2 * high
        while low < high:  # the narrowest width whose count reaches the target
            mid = (low + high) // 2
            if total(dataclasses.replace(base, decoder_hidden_dim=mid)) >= target:
                high = mid
            else:
                low = mid + 1
        out.append(Setting(f"normal-wide-z{s.latent_dim}-s{s.seed}", dataclasses.replace(base, decoder_hidden_dim=high),
                           "normal-wide", s.latent_dim, s.seed))
    if not out:
        raise PyroVAEError(f"parameter_matched names {matched!r}, which is not among the study's priors")
    return out


def parse_offsets(items: list[str]) -> dict[str, int]:
    """``--latent-dim-offsets`` items, PRIOR=N with N a whole number >= 0, each prior once."""
    out = {}
    for item in items:
        prior, _, n = (part.strip() for part in item.partition("="))
        if not prior or not (n.isascii() and n.isdigit()):  # (str.isdigit alone admits "²", which int() refuses)
            raise PyroVAEError(f"--latent-dim-offsets takes PRIOR=N with N a whole number >= 0, got {item!r}")
        if prior in out:
            raise PyroVAEError(f"--latent-dim-offsets names {prior} twice")
        out[prior] = int(n)
    return out


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
    unused = _fields_without_effect(setting.config.prior)
    return [f"{k}={stored[k]!r} (wanted {wanted[k]!r})" for k in wanted if stored[k] != wanted[k] and k not in unused]


def _fields_without_effect(prior: str) -> set[str]:
    """The ``prior_*`` fields a built-in prior does not read (a study's config file sets them for the priors
    that do): a difference there leaves a run as it was. None for a prior of your own."""
    from ..models.priors import USES

    if prior not in PRIORS:
        return set()
    return {name for name, users in USES.items() if prior not in users}
