r"""RMSprop, plain, centered and with momentum.

``D`` is the second-moment denominator: ``v`` (``square_avg``) or, centered,
``v - gbar**2`` (``grad_avg`` = gbar).  ``eta`` is the step's per-element factor:

* torch: ``eta = lr / (sqrt(D) + eps)``; without momentum ``d = g'`` (coupled L2 decay);
  with momentum the buffer holds ``b <- mu * b + g' / (sqrt(D) + eps)`` and
  ``theta -= lr * b``, so ``d = b * (sqrt(D) + eps)`` (the buffer in gradient units).
* keras: ``eta = lr / sqrt(D + eps)``; with momentum the buffer holds lr-scaled steps
  ``m <- mu * m + eta * g`` and ``theta -= m``, so ``d = m / eta``; decoupled decay.
* optax: ``eta = lr / sqrt(D + eps)`` (``eps_in_sqrt=True``, the default) or
  ``lr / (sqrt(D) + eps)``; ``bias_correction`` divides v and gbar by ``1 - decay**t``.
  Momentum is a ``trace`` *after* ``scale_by_learning_rate``, so it accumulates the
  signed, lr-scaled updates ``b <- mu * b - eta * g`` and ``theta += b``: ``d = -b / eta``
  (Nesterov: ``theta += mu * b - eta * g``, ``d = g - mu * b / eta``).
* tf1 (``tf.compat.v1.train.RMSPropOptimizer``): like keras, but the buffer
  ``mom <- mu * mom + eta * g`` exists even for ``mu = 0``, so ``d = mom / eta`` always;
  default eps 1e-10, ``ms`` starts at 1.

``step_size = lr``; ``eps_dominated``: ``sqrt(D) < eps`` (torch) or ``D < eps``.

>>> step_sizes(None, 7, {"lr": 0.01}, "torch")
{'step_size': 0.01}
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas._common import Elementwise, bias_corrected, coupled_direction

NAMES = ("rmsprop",)

_BASE = {"momentum": 0.0, "centered": False}
DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {**_BASE, "lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0,
              "maximize": False},
    "keras": {**_BASE, "lr": 1e-3, "rho": 0.9, "eps": 1e-7, "weight_decay": 0.0},
    "optax": {**_BASE, "lr": None, "decay": 0.9, "eps": 1e-8, "eps_in_sqrt": True,
              "initial_scale": 0.0, "nesterov": False, "bias_correction": False},
    "tf1": {**_BASE, "lr": None, "rho": 0.9, "eps": 1e-10},
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
        direction = coupled_direction(xp, state.get("param"), state["grad"], eta, 1.0, 0.0,
                                      h["weight_decay"], h["maximize"])
        return Elementwise(eta=eta, direction=direction, eps_dominated=root < eps)
    if convention == "optax":
        return _optax(xp, state, t, h)
    eta = lr / xp.sqrt(denominator + eps)
    lr_scaled_buffer = h["momentum"] or convention == "tf1"
    direction = buffer / eta if lr_scaled_buffer and buffer is not None else state["grad"]
    return Elementwise(eta=eta, direction=direction, decay_rate=lr * h.get("weight_decay", 0.0),
                       eps_dominated=denominator < eps)


def _optax(xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any]) -> Elementwise:
    """optax.rmsprop: eps in or outside the sqrt, optional bias correction, signed trace."""
    bias = 1 - h["decay"] ** t if h["bias_correction"] else 1.0
    denominator = bias_corrected(state["square_avg"], bias)
    if h["centered"]:
        denominator = denominator - bias_corrected(state["grad_avg"], bias) ** 2
    eps, lr, buffer = h["eps"], h["lr"], state.get("momentum_buffer")
    if h["eps_in_sqrt"]:
        eta, dominated = lr / xp.sqrt(denominator + eps), denominator < eps
    else:
        root = xp.sqrt(denominator)
        eta, dominated = lr / (root + eps), root < eps
    if not h["momentum"]:
        direction = state["grad"]
    elif h["nesterov"]:
        direction = state["grad"] - h["momentum"] * buffer / eta
    else:
        direction = -buffer / eta
    return Elementwise(eta=eta, direction=direction, eps_dominated=dominated)
