r"""SGD with optional momentum, dampening, Nesterov and weight decay.

The step is ``theta <- theta * (1 - decay_rate) - eta * d`` with ``eta = lr`` and

* no momentum: ``d = g'`` where ``g' = g + wd * theta`` (torch coupled L2; Keras decays
  theta instead, ``decay_rate = lr * wd``);
* torch / optax / tf1 momentum (lr outside the buffer): ``b <- mu * b + (1 - dampening) * g'``
  (torch's first buffer is ``g'`` itself; optax and tf1 never dampen), ``d = b``, or
  ``d = g' + mu * b`` with Nesterov;
* keras momentum (lr *inside* the buffer): ``m <- mu * m - lr * g``, ``theta += m``, so
  ``d = -m / lr`` (Nesterov: ``d = g - mu * m / lr``).  A schedule that changed lr leaves
  older lr values inside ``m``; ``d`` is still exactly what the step applied per unit lr.

``step_size`` is ``lr``.  ``eps_dominated`` is None (no eps).

>>> step_sizes(None, 5, {"lr": 0.1}, "torch")
{'step_size': 0.1}
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas._common import Elementwise, coupled_direction

NAMES = ("sgd", "momentum", "gradient_descent")
#: Neither formula reads the step index t (torch's SGD keeps no step counter).
USES_STEP = False

_BASE = {"momentum": 0.0, "nesterov": False, "weight_decay": 0.0}
DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {**_BASE, "lr": 1e-3, "dampening": 0.0, "maximize": False},
    "keras": {**_BASE, "lr": 0.01},
    "tf1": {**_BASE, "lr": None},
    "optax": {**_BASE, "lr": None},
}


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``{"step_size": lr}``."""
    return {"step_size": h["lr"]}


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta = lr; d from ``grad`` and ``momentum_buffer`` as in the module docstring."""
    lr, momentum, wd = h["lr"], h["momentum"], h["weight_decay"]
    if convention == "keras":
        buffer = state.get("momentum_buffer")
        if momentum == 0 or buffer is None:
            direction = state["grad"]
        elif h["nesterov"]:
            direction = state["grad"] - momentum * buffer / lr
        else:
            direction = -buffer / lr
        return Elementwise(eta=lr, direction=direction, decay_rate=lr * wd)
    maximize = h.get("maximize", False)
    if momentum == 0:
        rest, grad_coef = 0.0, 1.0
    elif h["nesterov"]:
        rest, grad_coef = momentum * state["momentum_buffer"], 1.0
    else:
        return Elementwise(eta=lr, direction=state["momentum_buffer"])
    direction = coupled_direction(xp, state.get("param"), state["grad"], lr, grad_coef, rest, wd, maximize)
    return Elementwise(eta=lr, direction=direction)
