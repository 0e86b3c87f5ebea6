r"""ASGD (torch): SGD with a decaying step and a shrink of theta.

Step t uses ``eta_t = lr / (1 + lambd * lr * (t - 1))**alpha`` (the value in the state
*before* the step: after it, ``state["eta"]`` already holds step t+1's value) and::

    theta <- theta * (1 - lambd * eta_t) - eta_t * g',   g' = g + wd * theta_before

so ``d = g'``, ``decay_rate = lambd * eta_t`` and ``step_size = eta_t``.  The backend
records ``eta_before`` ahead of the step; without it, eta_t is computed from a
constant lr (and the report says so).

>>> round(step_sizes(None, 1, {"lr": 0.01, "lambd": 1e-4, "alpha": 0.75}, "torch")["step_size"], 6)
0.01
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas._common import Elementwise

NAMES = ("asgd",)

DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {"lr": 1e-2, "lambd": 1e-4, "alpha": 0.75, "t0": 1e6, "weight_decay": 0.0,
              "maximize": False},
}


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``{"step_size": lr / (1 + lambd * lr * (t - 1))**alpha}`` for a constant lr."""
    return {"step_size": h["lr"] / (1 + h["lambd"] * h["lr"] * (t - 1)) ** h["alpha"]}


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta = ``eta_before`` (or the constant-lr value); d = the weight-decayed gradient."""
    eta = state.get("eta_before")
    if eta is None:
        eta = step_sizes(xp, t, h, convention)["step_size"]
    shrink = h["lambd"] * eta
    grad = -state["grad"] if h["maximize"] else state["grad"]
    # theta_after = theta_before * (1 - shrink - eta * wd) - eta * g
    theta_before = (state["param"] + eta * grad) / (1 - shrink - eta * h["weight_decay"])
    return Elementwise(eta=eta + 0 * grad, direction=grad + h["weight_decay"] * theta_before,
                       decay_rate=shrink)
