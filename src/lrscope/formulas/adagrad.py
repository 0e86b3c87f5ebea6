r"""Adagrad: per-element step sizes from the running sum of squared gradients S.

``d = g'`` (torch: ``g + wd * theta``, coupled) and ``S`` includes this step's ``g'**2``:

* torch: ``eta = clr / (sqrt(S) + eps)`` with ``clr = lr / (1 + (t - 1) * lr_decay)``;
  ``S_0 = initial_accumulator_value`` (default 0); ``step_size = clr``.
* keras: ``eta = lr / sqrt(S + eps)``, ``S_0 = 0.1``, decoupled weight decay.
* optax: ``eta = lr / sqrt(S + eps)`` where ``S > 0`` and 0 where ``S == 0``; ``S_0 = 0.1``.

``eps_dominated``: ``sqrt(S) < eps`` (torch), ``S < eps`` (keras, optax).

>>> step_sizes(None, 3, {"lr": 0.01, "lr_decay": 0.5}, "torch")
{'step_size': 0.005}
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas._common import Elementwise, coupled_direction

NAMES = ("adagrad",)

DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {"lr": 1e-2, "lr_decay": 0.0, "weight_decay": 0.0, "initial_accumulator_value": 0.0,
              "eps": 1e-10, "maximize": False},
    "keras": {"lr": 1e-3, "initial_accumulator_value": 0.1, "eps": 1e-7, "weight_decay": 0.0},
    "optax": {"lr": None, "initial_accumulator_value": 0.1, "eps": 1e-7},
}


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``{"step_size": lr / (1 + (t - 1) * lr_decay)}`` (torch) or ``lr``."""
    if convention == "torch":
        return {"step_size": h["lr"] / (1 + (t - 1) * h["lr_decay"])}
    return {"step_size": h["lr"]}


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta from the accumulator ``sum``; d = the (weight-decayed) gradient."""
    total, eps = state["sum"], h["eps"]
    lr = step_sizes(xp, t, h, convention)["step_size"]
    if convention == "torch":
        root = xp.sqrt(total)
        eta = lr / (root + eps)
        direction = coupled_direction(xp, state.get("param"), state["grad"], eta, 1.0, 0.0,
                                      h["weight_decay"], h["maximize"])
        return Elementwise(eta=eta, direction=direction, eps_dominated=root < eps)
    eta = lr / xp.sqrt(total + eps)
    if convention == "optax":
        eta = xp.where(total > 0, eta, 0 * eta)
    decay = lr * h.get("weight_decay", 0.0)
    return Elementwise(eta=eta, direction=state["grad"], decay_rate=decay, eps_dominated=total < eps)
