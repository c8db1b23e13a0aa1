"""A prior of your own, by name: how config.json records it (``module:attribute``, its arguments, the
folder its module came from) and how a run imports it again, only when trusted.

    prior        "my_priors:cauchy"        a function or class of latent_dim, or an object
    prior_args   {"df": 2.5}               keyword arguments after latent_dim (--prior-arg df=2.5)
    prior_path   "/home/me/project"        where my_priors.py was found when the run was trained

An object passed as ``prior=`` is recorded by its class when that class can be imported and every
argument its constructor needs besides latent_dim can be read back from the object's attributes;
otherwise as ``<object>``, and the object must be passed again to reload the run.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PyroVAEError, first_line

OBJECT = "<object>"
"""How config.json names a prior given as an object that cannot be recorded by name."""


class UntrustedPrior(PyroVAEError):
    """A prior named as ``module:attribute`` in a file, which the caller did not allow to be imported."""

    def __init__(self, spec: str):
        self.spec = spec
        super().__init__(f"the prior {spec!r} would import the module {spec.partition(':')[0]!r} and run its "
                         "code: if you trust it, pass --trust-prior (load_run(..., trust=True)), or pass the "
                         "prior object itself (prior=)")


@dataclass(frozen=True)
class PriorReference:
    """What config.json records of a prior given as an object (see the module docstring)."""

    name: str = OBJECT
    args: dict = field(default_factory=dict)
    path: str | None = None


def _scalar(value) -> bool:
    return isinstance(value, (bool, int, float, str)) and not (isinstance(value, float) and value != value)


def prior_reference(obj) -> PriorReference:
    """How config.json names a prior given as an object: ``module:qualname`` for an importable function
    or class, ``module:Class`` with its recoverable arguments for an instance, else ``<object>``."""
    target = obj if (inspect.isfunction(obj) or inspect.isclass(obj)) else getattr(type(obj), "adapted_from",
                                                                                    type(obj))
    name = _importable_name(target)
    if name is None:
        return PriorReference()
    args = {}
    if target is not obj:  # an instance: its constructor's arguments, read back from its attributes
        try:
            params = list(inspect.signature(target.__init__).parameters.values())[2:]  # after self, latent_dim
        except (TypeError, ValueError):
            return PriorReference()
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if not hasattr(obj, p.name):
                return PriorReference()  # kept under another name, or not at all: the object must come again
            value = getattr(obj, p.name)
            if not _scalar(value):
                return PriorReference()
            if value != p.default:
                args[p.name] = value
    module_file = getattr(sys.modules.get(target.__module__), "__file__", None)
    return PriorReference(name, args, str(Path(module_file).resolve().parent) if module_file else None)


def _importable_name(target) -> str | None:
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", "")
    if not module or module == "__main__" or not qualname or "<" in qualname:
        return None
    name = f"{module}:{qualname}"
    try:
        return name if import_prior(name) is target else None
    except PyroVAEError:
        return None


def module_folder(spec: str) -> str | None:
    """The folder the (imported) module of ``module:attribute`` was loaded from."""
    module_file = getattr(sys.modules.get(spec.partition(":")[0]), "__file__", None)
    return str(Path(module_file).resolve().parent) if module_file else None


def import_prior(spec: str, path: str | None = None):
    """Import ``module:attribute`` (which runs the module's code: callers decide whether to trust it),
    looking in ``path`` first if given, else in the working directory too."""
    from ..config import PRIOR_REFERENCE

    if not PRIOR_REFERENCE.fullmatch(spec):
        raise PyroVAEError(f"a prior of your own is named module:attribute (e.g. my_priors:cauchy), got {spec!r}")
    module_name, _, attr = spec.partition(":")
    folder = path if path and Path(path).is_dir() else os.getcwd()
    added = folder not in sys.path
    if added:  # for this import only: later imports of other packages must not look in this folder first
        sys.path.insert(0, folder)
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        where = f" (it was in {path} when the run was trained)" if path else ""
        raise PyroVAEError(f"cannot import prior {spec!r}: {e}{where}; make {module_name!r} importable: install it, "
                           f"set PYTHONPATH to its folder, or run from there") from None
    except ImportError as e:
        raise PyroVAEError(f"cannot import prior {spec!r}: {e}") from None
    except SyntaxError as e:
        raise PyroVAEError(f"cannot import prior {spec!r}: a syntax error in {e.filename}, line {e.lineno}: "
                           f"{e.msg}") from None
    except Exception as e:  # the module's own code raised while it was imported
        first = first_line(e)
        raise PyroVAEError(f"cannot import prior {spec!r}: importing {module_name!r} raised "
                           f"{type(e).__name__}: {first}") from None
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as e:
        raise PyroVAEError(f"cannot import prior {spec!r}: {e}") from None
    return obj


def with_arguments(obj, args):
    """``obj`` with keyword arguments bound after latent_dim (``--prior-arg``); ``obj`` itself if none."""
    args = dict(args or ())
    if not args or not (inspect.isfunction(obj) or inspect.isclass(obj)):
        return obj  # an object is used as it is (its recorded arguments serve to rebuild it by name)
    try:
        inspect.signature(obj).bind(0, **args)
    except TypeError as e:
        raise PyroVAEError(f"--prior-arg {', '.join(args)}: {getattr(obj, '__name__', obj)} does not take it ({e})") \
            from None
    return functools.update_wrapper(functools.partial(obj, **args), obj) if inspect.isfunction(obj) else \
        functools.partial(obj, **args)
