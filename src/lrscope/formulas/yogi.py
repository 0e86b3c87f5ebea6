r"""Yogi (Zaheer et al., 2018): Adam with an additive second-moment update.

The second moment moves towards ``g**2`` by a fixed fraction of ``g**2`` instead of
decaying multiplicatively::

    v <- v - (1 - beta2) * sign(v - g**2) * g**2

and the step is Adam's (optax ``scale_by_yogi``, the only framework with Yogi)::

    m_hat = m / (1 - beta1**t)                                  # the direction d
    eta   = lr / (sqrt(v / (1 - beta2**t) + eps_root) + eps)
    alpha_t = lr * sqrt(1 - beta2**t) / (1 - beta1**t)          # "step_size"

optax starts m and v at ``initial_accumulator_value`` (1e-6), not 0, yet still divides
by ``1 - beta**t``; default eps is 1e-3, large enough that ``eps_dominated`` (where
``sqrt(v_hat) < eps``) is common early in training.

>>> h = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999}
>>> round(float(step_sizes(None, 1, h, "optax")["step_size"]), 5)
0.00316

Reference: Zaheer et al., "Adaptive Methods for Nonconvex Optimization" (NeurIPS 2018).
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas._common import Elementwise, bias_corrected

NAMES = ("yogi",)

DEFAULTS: dict[str, dict[str, Any]] = {
    "optax": {"lr": None, "beta1": 0.9, "beta2": 0.999, "eps": 1e-3, "eps_root": 0.0,
              "initial_accumulator_value": 1e-6},
}


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``{"step_size": lr * sqrt(1 - beta2**t) / (1 - beta1**t)}``."""
    return {"step_size": h["lr"] * (1 - h["beta2"] ** t) ** 0.5 / (1 - h["beta1"] ** t)}


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta from ``exp_avg_sq`` (Yogi's v), d = bias-corrected ``exp_avg``."""
    root = xp.sqrt(bias_corrected(state["exp_avg_sq"], 1 - h["beta2"] ** t) + h["eps_root"])
    return Elementwise(
        eta=h["lr"] / (root + h["eps"]),
        direction=bias_corrected(state["exp_avg"], 1 - h["beta1"] ** t),
        eps_dominated=root < h["eps"],
    )
