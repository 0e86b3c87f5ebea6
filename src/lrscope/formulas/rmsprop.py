r"""RMSprop, plain, centered and with momentum.

``D`` is the second-moment denominator: ``v`` (``square_avg``) or, centered,
``v - gbar**2`` (``grad_avg`` = gbar).  ``eta`` is the step's per-element factor:

* torch: ``eta = lr / (sqrt(D) + eps)``; without momentum ``d = g'`` (coupled L2 decay);
  with momentum the buffer holds ``b <- mu * b + g' / (sqrt(D) + eps)`` and
  ``theta -= lr * b``, so ``d = b * (sqrt(D) + eps)`` (the buffer in gradient units).
* keras: ``eta = lr / sqrt(D + eps)``; with momentum the buffer holds lr-scaled steps
  ``m <- mu * m + eta * g`` and ``theta -= m``, so ``d = m / eta``; decoupled decay.
* optax (``eps_in_sqrt=True``, the default): ``eta = lr / sqrt(D + eps)``; momentum
  (``trace`` after ``scale_by_learning_rate``) is handled like keras.

``step_size = lr``; ``eps_dominated``: ``sqrt(D) < eps`` (torch) or ``D < eps``.

>>> step_sizes(None, 7, {"lr": 0.01}, "torch")
{'step_size': 0.01}
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas._common import Elementwise, coupled_direction

NAMES = ("rmsprop",)

_BASE = {"momentum": 0.0, "centered": False}
DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {**_BASE, "lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0,
              "maximize": False},
    "keras": {**_BASE, "lr": 1e-3, "rho": 0.9, "eps": 1e-7, "weight_decay": 0.0},
    "optax": {**_BASE, "lr": None, "decay": 0.9, "eps": 1e-8, "eps_in_sqrt": True,
              "initial_scale": 0.0, "nesterov": False, "bias_correction": False},
}


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``{"step_size": lr}``."""
    return {"step_size": h["lr"]}


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta from ``square_avg`` (and ``grad_avg`` when centered); d as in the docstring."""
    denominator = state["square_avg"]
    if h["centered"]:
        denominator = denominator - state["grad_avg"] ** 2
    eps, lr, buffer = h["eps"], h["lr"], state.get("momentum_buffer")
    if convention == "torch":
        root = xp.sqrt(denominator)
        eta = lr / (root + eps)
        if h["momentum"] > 0:
            return Elementwise(eta=eta, direction=buffer * (root + eps), eps_dominated=root < eps)
        direction = coupled_direction(xp, state["param"], state["grad"], eta, 1.0, 0.0,
                                      h["weight_decay"], h["maximize"])
        return Elementwise(eta=eta, direction=direction, eps_dominated=root < eps)
    eta = lr / xp.sqrt(denominator + eps)
    direction = buffer / eta if h["momentum"] and buffer is not None else state["grad"]
    return Elementwise(eta=eta, direction=direction, decay_rate=lr * h.get("weight_decay", 0.0),
                       eps_dominated=denominator < eps)
