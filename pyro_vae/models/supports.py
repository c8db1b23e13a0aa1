"""Supports of z and the maps onto them: one place for what guides and NUTS both need.

A guide of a Euclidean family (and NUTS) lives on R^m and reaches a constrained support through
``T = biject_to(support)`` (torch's constraint registry, as Pyro's autoguides do). Two wrinkles:

* a mixture of one family (``MixtureSameFamily``) lives where its components do, but torch gives
  its support a constraint of its own with no ``biject_to``: :func:`unwrap_mixture` looks through it;
* the whole of R^d needs no map at all: :func:`bijection` returns None there.
"""

from __future__ import annotations

from pyro.distributions import constraints
from torch.distributions import biject_to
from torch.distributions.mixture_same_family import MixtureSameFamilyConstraint


def unwrap_mixture(support):
    """A mixture's support is its components' support (through any nesting)."""
    while isinstance(support, MixtureSameFamilyConstraint):
        support = support.base_constraint
    return support


def is_real(support) -> bool:
    """Whether ``support`` is R^d (``real`` under any number of ``independent`` wrappers)."""
    base = unwrap_mixture(support)
    while isinstance(base, constraints.independent):
        base = base.base_constraint
    return base is constraints.real


def bijection(support):
    """``biject_to(support)`` for a constrained support, None for the whole of R^d;
    NotImplementedError where torch registers no bijection (e.g. the sphere)."""
    support = unwrap_mixture(support)
    return None if is_real(support) else biject_to(support)


def reachable(support) -> bool:
    """Whether a Euclidean family can be mapped onto ``support``."""
    try:
        bijection(support)
        return True
    except NotImplementedError:
        return False


def describe(support) -> str:
    return repr(support).replace("\n", " ")
