r"""D-Adaptation SGD (Defazio & Mishchenko, 2023): dual averaging with primal averaging.

``dadaptation.DAdaptSGD``, step t, ``d`` the estimate as the step began, ``lr`` the
**largest** lr over the groups, ``g0`` the norm of the first step's gradients
(``group["g0_norm"]``), ``g' = g + wd * theta`` (added to the gradient in place, with
the *first* group's wd for every group), ``mu`` the momentum and ``c = 1 - mu``::

    dlr   = d * lr / g0                                   # "step_size"
    s    <- s + dlr * g'
    z     = x0 - s
    theta <- (1 - c) * theta + c * z

so ``eta = dlr`` for every element, and ``d_dir`` is what the step applied per unit step
size: ``g'`` (the gradient after the step) without momentum, where theta is z, and with
momentum, from ``theta_before = (theta - c * z) / (1 - c)``::

    d_dir = c / (1 - c) * (theta - z) / dlr

``decay_rate = 0`` (the decay is coupled).  Reported: ``step_size = dlr``, ``d``
(recorded before the step by ``watch()``), ``d_next``.
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas._common import Elementwise

NAMES = ("dadapt_sgd",)
STEP_SCALARS = ("step_size",)
#: Hyperparameters that change every step, read from STEP_SCALARS in the state when there.
PER_STEP = ("d", "d_next")

DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {"lr": 1.0, "momentum": 0.0, "weight_decay": 0.0, "d": 1e-6, "d_next": 1e-6,
              "g0_norm": 1.0},
}


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``step_size = d * lr / g0_norm``, ``d``, ``d_next``."""
    return {"step_size": h["d"] * h["lr"] / h["g0_norm"], "d": h["d"], "d_next": h["d_next"]}


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta = dlr; d = g' without momentum, else from theta and z after the step."""
    dlr = state["step_size"] if "step_size" in state else step_sizes(xp, t, h, convention)["step_size"]
    c = 1 - h["momentum"]
    if c == 1:
        return Elementwise(eta=dlr, direction=state["grad"])
    return Elementwise(eta=dlr, direction=c / (1 - c) * (state["param"] - state["z"]) / dlr)
