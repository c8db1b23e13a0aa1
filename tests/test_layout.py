"""The shape of the house: acyclic imports, one home per concern, small functions and files, and the
configuration's choices pinned to the registries that build them."""

import ast
from pathlib import Path

import pytest

from pyro_vae import config
from pyro_vae.inference.objectives import OBJECTIVES
from pyro_vae.models.guides import FAMILIES
from pyro_vae.models.likelihoods import LIKELIHOODS
from pyro_vae.models.networks import NETWORKS
from pyro_vae.inference.step import SCHEDULES
from pyro_vae.inference.tracking import TRACKERS
from pyro_vae.models.guides import DiagonalNormal
from pyro_vae.models.priors import FLOWS

PACKAGE = Path(__file__).resolve().parents[1] / "pyro_vae"
MODULES = sorted(PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


NAMES = {_name(p) for p in MODULES}


def _imports(path: Path) -> set[str]:
    """The pyro_vae modules a file imports, at module level or inside functions."""
    package = _name(path) if path.name == "__init__.py" else _name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in NAMES else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in NAMES}


GRAPH = {_name(p): _imports(p) - {_name(p)} for p in MODULES}


def test_imports_are_acyclic():
    """Package __init__ files only re-export; every other import points one way, lazy ones included."""
    graph = {m: {t for t in targets if not (PACKAGE / Path(*t.split(".")[1:]) / "__init__.py").is_file()}
             for m, targets in GRAPH.items()}
    state: dict[str, int] = {}

    def visit(module, stack):
        state[module] = 1
        for target in graph.get(module, ()):
            if state.get(target) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(target):] + [target]))
            if target not in state:
                visit(target, stack + [target])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_models_do_not_reach_into_inference_or_runs():
    for module, targets in GRAPH.items():
        if module.startswith("pyro_vae.models"):
            assert not {t for t in targets if t.startswith(("pyro_vae.inference", "pyro_vae.study",
                                                           "pyro_vae.run_dir", "pyro_vae.cli"))}, module


def test_only_the_runners_import_the_training_loop():
    """Data as a run saw it comes from data.py and Run.split, never from the training loop."""
    importers = {m for m, targets in GRAPH.items() if "pyro_vae.inference.train" in targets}
    runners = {"pyro_vae", "pyro_vae.inference", "pyro_vae.cli", "pyro_vae.study.executors",
               "pyro_vae.inference.distributed"}  # the last: data-parallel training shares the loop's finish
    assert importers <= runners, importers


def test_functions_and_files_stay_small():
    long_functions, long_files = [], []
    for path in MODULES:
        text = path.read_text()
        if len(text.splitlines()) > 450:
            long_files.append(path.name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long_functions.append(f"{path.name}:{node.name}")
    assert not long_files and not long_functions, (long_files, long_functions)


def test_config_choices_are_the_registries():
    assert config.GUIDES == FAMILIES
    assert config.LIKELIHOODS == ("auto", *LIKELIHOODS)
    assert config.NETWORKS == NETWORKS
    assert config.OBJECTIVES == OBJECTIVES
    assert config.FLOWS == FLOWS
    assert config.SCHEDULES == SCHEDULES and config.LOGS == TRACKERS and config.GUIDE_SCALES == DiagonalNormal.SCALES
