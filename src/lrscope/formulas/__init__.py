"""Optimizer families: every formula lrscope uses, stated once, framework-free.

Each family module documents its update rule in the form
``delta_theta = -eta * d - decay_rate * theta`` (SPEC §1) and the framework
conventions that differ.  This registry maps names to modules and offers the
data-independent step size.

>>> round(step_size("adam", 1, lr=1e-3), 7)
0.0003162
>>> round(step_size("adam", 10, lr=1e-3), 7) < 0.16e-3
True
>>> step_size("adam", 1, lr=1e-3, convention="keras") == step_size("adam", 1, lr=1e-3)
True
"""

from __future__ import annotations

import math
import numbers
from types import ModuleType
from typing import Any

import numpy as np

from lrscope.formulas import (
    adabelief, adadelta, adafactor, adagrad, adam, adamax, adamw_nesterov, adan, ademamix, adopt,
    asgd, dadapt_adagrad, dadapt_adam, dadapt_adan, dadapt_lion, dadapt_sgd, ftrl, lamb, laprop, lion,
    mars, muon, muon_adamw, nadam, prodigy, radam, rmsprop, rprop, schedule_free, sgd, yogi,
)
from lrscope.formulas._common import CONVENTIONS, Elementwise, is_zero, resolve

FAMILIES: dict[str, ModuleType] = {
    module.NAMES[0]: module
    for module in (adam, sgd, adamax, nadam, radam, adagrad, rmsprop, adadelta, adafactor,
                   lion, rprop, asgd, adabelief, yogi, lamb, muon, prodigy, schedule_free, dadapt_adam,
                   dadapt_sgd, dadapt_adagrad, adamw_nesterov, laprop, adopt, adan, ademamix, mars, ftrl,
                   muon_adamw, dadapt_lion, dadapt_adan)
}
_BY_NAME: dict[str, Any] = {name: module for module in FAMILIES.values() for name in module.NAMES}


def register_family(module: Any) -> str:
    """Add a family (a module or any object with ``NAMES``, ``DEFAULTS``, ``step_sizes``
    and ``elementwise``, as the modules here) under its ``NAMES``; returns its first name.
    A name already taken by another family is refused.
    """
    missing = [a for a in ("NAMES", "DEFAULTS", "step_sizes", "elementwise") if not hasattr(module, a)]
    if missing:
        raise TypeError(f"a family needs {', '.join(missing)} (see lrscope.formulas._common)")
    taken = [n for n in module.NAMES if _BY_NAME.get(n.lower(), module) is not module]
    if taken:
        raise ValueError(f"family name(s) {taken} are taken by another family")
    FAMILIES[module.NAMES[0]] = module
    _BY_NAME.update({name.lower(): module for name in module.NAMES})
    return module.NAMES[0]


def family(name: str) -> ModuleType:
    """The family module answering to ``name`` (case-insensitive, e.g. ``"AdamW"``)."""
    try:
        return _BY_NAME[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown optimizer {name!r}; choose one of {', '.join(sorted(_BY_NAME))}"
        ) from None


def chunkable(name: str) -> bool:
    """Whether the family's formula works on flat chunks of the state: not where eta needs
    whole tensors in their own shape (Lamb's trust ratio, Adafactor's factored moments),
    whose modules set ``CHUNKABLE = False``.

    >>> chunkable("adam"), chunkable("lamb")
    (True, False)
    """
    return getattr(family(name), "CHUNKABLE", True)


def default_convention(name: str) -> str:
    """The first of torch, keras, tf1, optax that the family exists in."""
    return next(c for c in CONVENTIONS if c in family(name).DEFAULTS)


def hyperparameters(name: str, convention: str | None = None, **hyper: Any) -> dict[str, Any]:
    """The family's defaults for ``convention`` overridden by ``hyper`` (validated).

    Names follow the family docstring (``beta1``/``beta2`` or ``betas``, ``eps``, ...).
    ``name="adamw"`` implies decoupled weight decay (torch's default 1e-2 for AdamW).
    """
    module = family(name)
    convention = convention or default_convention(name)
    h = resolve(name, module.DEFAULTS, convention, hyper)
    if name.lower() in ("adamw", "nadamw", "radamw") and "decoupled_weight_decay" in h:
        h["decoupled_weight_decay"] = True
        if "weight_decay" not in hyper:
            h["weight_decay"] = 1e-2 if convention in ("torch", "tf1") else 4e-3 if convention == "keras" else 1e-4
    if name.lower() == "amsgrad":
        h["amsgrad"] = True
    if h.get("lr") is None:
        raise ValueError(f"{name!r} has no default lr in the {convention} convention; pass lr=")
    return h


def checked(h: dict[str, Any]) -> dict[str, Any]:
    """``h``, after checking that its lr and eps (where given as numbers) are finite and
    >= 0, as every framework's optimizer requires: for the offline step sizes and curves,
    where such a value is a typo (a training run with a NaN lr is reported, not refused).

    >>> checked({"lr": -1e-3})
    Traceback (most recent call last):
    ...
    ValueError: lr must be finite and >= 0, got -0.001
    """
    for name in ("lr", "eps"):
        value = h.get(name)
        if isinstance(value, (int, float)) and not 0 <= value < math.inf:
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return h


def step_count(value: Any, what: str) -> int:
    """``value`` as an int, if it is a whole number of steps in [1, 2**63) (numpy integers
    included, bools not): the framework step counters' range.

    >>> step_count(1.5, "t")
    Traceback (most recent call last):
    ...
    ValueError: t must be a whole number >= 1, got 1.5
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be a whole number >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{what} is a 1-based count of steps and must be >= 1, got {value}")
    if value >= 2**63:
        raise ValueError(f"{what} must be a whole number >= 1 and < 2**63, got {value}")
    return int(value)


def step_sizes(name: str, t: Any, convention: str | None = None, **hyper: Any) -> dict[str, Any]:
    """All data-independent scalars of step ``t`` (int or numpy array of ints)."""
    convention = convention or default_convention(name)
    h = checked(hyperparameters(name, convention, **hyper))
    return family(name).step_sizes(np, t, h, convention)


def step_size(name: str, t: int, *, convention: str | None = None, term: str = "step_size",
              **hyper: Any) -> float:
    """alpha_t of step ``t`` (1-based) for optimizer ``name``.

    ``term`` picks a family extra (NAdam's ``"step_size_grad"``).
    """
    values = step_sizes(name, step_count(t, "t"), convention, **hyper)
    if term not in values:
        raise ValueError(f"{name!r} has no term {term!r}; choose one of {sorted(values)}")
    return float(values[term])


__all__ = ["CONVENTIONS", "Elementwise", "FAMILIES", "chunkable", "family", "default_convention",
           "is_zero", "hyperparameters", "checked", "register_family", "step_count", "step_size",
           "step_sizes"]
