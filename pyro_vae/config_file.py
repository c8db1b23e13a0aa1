"""Config files and recipes: a run's settings, and a study's, written down once.

A config file is TOML (read with the standard library's ``tomllib``), JSON (a run's config.json), or
YAML where PyYAML is installed. Its top-level keys are :class:`~pyro_vae.config.Config` fields (the
``train`` flags without their dashes, ``latent_dim = 40``); an optional ``[study]`` table holds what
``compare`` and ``sweep-beta`` take besides (``priors``, ``betas``, ``latent_dims``, ``seeds``, ``k``;
``latent_dim_offsets`` for compare: a prior's runs at size d get latent_dim d + n, as the sphere's S^d in R^(d+1)).
Every flag given on the command line overrides the file. A ``[study.published]`` table holds the figures a
paper reports for the same settings, which the study's report sets beside its own: ``source`` (who, where,
in what units), then one number per prior or beta (``normal = -88.56``), or a table of them by latent size
(``normal = {2 = -135.73, 5 = -110.21}``).

Recipes ship with the package in ``pyro_vae/recipes/``: ``--config recipes/vampprior-static-mnist.toml``
(or just ``--config vampprior-static-mnist``) finds one when no such file exists where you are.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config
from .errors import PyroVAEError, first_line

RECIPES = Path(__file__).resolve().parent / "recipes"
STUDY_OPTIONS = {"priors": (list, str), "betas": (list, (int, float)), "latent_dims": (list, int),
                 "seeds": (int, None), "k": (int, None), "published": (dict, None),
                 "latent_dim_offsets": (dict, int), "parameter_matched": (str, None)}


@dataclass
class ConfigFile:
    """What a config file says: Config fields (checked for names and types) and study options."""

    path: Path
    fields: dict = field(default_factory=dict)
    study: dict = field(default_factory=dict)


def recipes() -> list[str]:
    """The names of the recipes shipped with the package."""
    return sorted(p.stem for p in RECIPES.glob("*.toml"))


def find_config_file(name: str | Path) -> Path:
    """The file ``name`` if it exists, else the shipped recipe of that name."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (RECIPES / path.name, RECIPES / f"{path.name}.toml"):
        if candidate.is_file():
            return candidate
    raise PyroVAEError(f"config file {name} does not exist (shipped recipes: {', '.join(recipes()) or 'none'})")


def _parse(path: Path) -> Any:
    text = path.read_bytes()
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text.decode())
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise PyroVAEError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or write it as TOML") from None
            return yaml.safe_load(text)
        return json.loads(text)
    except PyroVAEError:
        raise
    except Exception as e:  # tomllib.TOMLDecodeError, json's ValueError, yaml.YAMLError, UnicodeDecodeError
        first = first_line(e, 120)
        raise PyroVAEError(f"{path}: not a valid {path.suffix.lstrip('.').upper() or 'JSON'} file ({first})") from None


def read_config_file(name: str | Path) -> ConfigFile:
    """Read and check a config file (see the module docstring); one-line errors that name the file."""
    path = find_config_file(name)
    content = _parse(path)
    if not isinstance(content, dict):
        raise PyroVAEError(f"{path}: expected a table of config fields, got {type(content).__name__}")
    content = dict(content)
    study = content.pop("study", {})
    if not isinstance(study, dict):
        raise PyroVAEError(f"{path}: [study] must be a table")
    try:
        Config.from_dict(content).validate()  # names, types and ranges of the fields it sets
    except PyroVAEError as e:
        raise PyroVAEError(f"{path}: {e}") from None
    for key, value in study.items():
        if key not in STUDY_OPTIONS:
            raise PyroVAEError(f"{path}: unknown [study] option {key!r}; choose from {', '.join(STUDY_OPTIONS)}")
        if key == "published":
            check_published(value, path)
            continue
        outer, inner = STUDY_OPTIONS[key]
        ok = isinstance(value, outer) and not isinstance(value, bool)
        if ok and outer is list:
            ok = len(value) > 0 and all(isinstance(v, inner) and not isinstance(v, bool) for v in value)
        if ok and outer is dict:
            ok = all(isinstance(v, inner) and not isinstance(v, bool) and v >= 0 for v in value.values())
        if not ok:
            what = {list: "a non-empty list", dict: "a table of prior = whole number >= 0"}.get(outer, "an integer")
            raise PyroVAEError(f"{path}: [study] {key} must be {what}, got {value!r:.60}")
    return ConfigFile(path=path, fields=content, study=study)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf")


def check_published(published, path: Path | str = "[study]") -> None:
    """``[study.published]``: a ``source`` string and, per label, a finite number or a table of latent size
    (a whole number) -> finite number; one-line errors naming the entry."""
    if not isinstance(published, dict):
        raise PyroVAEError(f"{path}: [study.published] must be a table")
    if not isinstance(published.get("source"), str) or not published["source"].strip():
        raise PyroVAEError(f"{path}: [study.published] needs a source = \"...\" (who reported the figures, in what units)")
    setting = published.get("setting")
    if setting is not None:
        if not isinstance(setting, dict):
            raise PyroVAEError(f"{path}: [study.published.setting] must be a table")
        unknown = sorted(set(setting) - set(SETTING_KEYS))
        if unknown:
            raise PyroVAEError(f"{path}: [study.published.setting] has unknown keys {', '.join(unknown)}; "
                               f"choose from {', '.join(SETTING_KEYS)}")
        for key, value in setting.items():
            want = str if key == "dataset" else int
            if not isinstance(value, want) or isinstance(value, bool) or (want is int and value < 1):
                raise PyroVAEError(f"{path}: [study.published.setting] {key} must be "
                                   f"{'a string' if want is str else 'a whole number >= 1'}, got {value!r:.40}")
    for label, value in published.items():
        if label in ("source", "setting"):
            continue
        entries = value.items() if isinstance(value, dict) else [(None, value)]
        for size, number in entries:
            if size is not None and not str(size).isdigit():
                raise PyroVAEError(f"{path}: [study.published] {label}: latent sizes are whole numbers, got {size!r}")
            if not _number(number):
                raise PyroVAEError(f"{path}: [study.published] {label}"
                                   f"{'' if size is None else f' at latent size {size}'} must be a finite number, "
                                   f"got {number!r:.40}")


def published_value(published: dict | None, label: str, latent_dim: int) -> float | None:
    """The published figure for a label at a latent size (None if the source has none)."""
    value = (published or {}).get(label) if label not in ("source", "setting") else None
    if isinstance(value, dict):
        value = value.get(str(latent_dim))
    return None if value is None else float(value)


SETTING_KEYS = ("dataset", "prior_components", "k", "epochs", "test_points")
"""What ``[study.published.setting]`` may state of the source's measurement: the dataset (as ``--dataset``
names it), the mixture/VampPrior components K, the importance samples of log p(x), the most epochs it
trained (its budget) and the test points it averaged over. The latent size is a figure's own key."""

BUDGET_SHARE = 0.1
"""A study trained for less than this share of the source's epochs is not compared with it at all."""


def published_comparison(published: dict | None, config, k: int, test_points: int, prior: str) -> tuple[list[str], str]:
    """Whether a study's figure (a run of ``config``, log p(x) with ``k`` samples on ``test_points``) may sit
    beside the source's: the list of what differs (empty: comparable) and a note on the budget ("300 of up
    to 2000 epochs", or ""). The dataset, K, the test points and, for mixture priors, the components must
    match; the budget may fall short, and then the note says by how much, unless the study trained for
    less than a tenth of the source's epochs, which counts as a difference."""
    setting = (published or {}).get("setting")
    if not setting:
        return ["the source's setting is not stated ([study.published.setting])"], ""
    differs = []
    if "dataset" in setting and setting["dataset"] != config.dataset:
        differs.append(f"dataset {config.dataset!r} (source: {setting['dataset']!r})")
    if "k" in setting and setting["k"] != k:
        differs.append(f"K = {k} importance samples (source: {setting['k']})")
    if "test_points" in setting and setting["test_points"] != test_points:
        differs.append(f"{test_points} test points (source: {setting['test_points']})")
    if ("prior_components" in setting and prior in ("mog", "mog-enum", "vamp")
            and setting["prior_components"] != config.prior_components):
        differs.append(f"K = {config.prior_components} components (source: {setting['prior_components']})")
    note = ""
    if "epochs" in setting:
        ours, theirs = config.epochs, setting["epochs"]
        if ours < BUDGET_SHARE * theirs:
            differs.append(f"a budget of {ours} epochs (source: up to {theirs})")
        elif ours < theirs:
            note = f"budget {ours} of the source's up to {theirs} epochs ({100 * ours / theirs:.0f}%)"
    return differs, note
