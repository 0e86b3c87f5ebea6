r"""Rprop: per-element step sizes kept in the optimizer state.

torch keeps ``step_size`` (eta, already adapted for this step) and ``prev`` (this
step's gradient, zeroed where its sign flipped), and moves ``theta -= eta * sign(prev)``::

    eta = state["step_size"],   d = sign(prev)

optax's ``scale_by_rprop`` emits the update it stored on the *previous* step (one step
late: at t = 1 nothing moves), zeroed where the gradient's sign flipped; the backend
passes the state before the step (``step_size`` and ``prev`` = ``prev_updates``)::

    eta = step_size_before,   d = sign(prev_before), 0 where grad * prev_before < 0

There is no data-independent scalar: ``step_size`` reports ``lr``, the initial
per-element step.  ``eps_dominated`` is None.

>>> step_sizes(None, 4, {"lr": 0.01}, "torch")
{'step_size': 0.01}
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas._common import Elementwise

NAMES = ("rprop",)

DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {"lr": 1e-2, "etas": (0.5, 1.2), "step_sizes": (1e-6, 50.0), "maximize": False},
    "optax": {"lr": None, "eta_minus": 0.5, "eta_plus": 1.2, "min_step_size": 1e-6,
              "max_step_size": 50.0},
}


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``{"step_size": lr}`` (the initial per-element step)."""
    return {"step_size": h["lr"]}


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta = ``step_size`` from the state; d = ``sign(prev)``."""
    direction = xp.sign(state["prev"])
    if convention == "optax":
        direction = xp.where(state["grad"] * state["prev"] < 0, 0 * direction, direction)
    return Elementwise(eta=state["step_size"], direction=direction)
