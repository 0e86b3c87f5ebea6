r"""AdaBelief (Zhuang et al., 2020): Adam whose denominator is the "belief" in g.

The second moment tracks the squared deviation of g from its running mean m
(optax ``scale_by_belief``; ``eps_root`` is added to s every step, inside the state)::

    m <- beta1 * m + (1 - beta1) * g
    s <- beta2 * s + (1 - beta2) * (g - m)**2 + eps_root
    eta = lr / (sqrt(s / (1 - beta2**t)) + eps)
    d   = m / (1 - beta1**t)        # nesterov: the same Nesterov combination as optax NAdam
    alpha_t = lr * sqrt(1 - beta2**t) / (1 - beta1**t)          # "step_size"

``eps_dominated`` where ``sqrt(s_hat) < eps``.  Defaults (optax): eps = eps_root = 1e-16.

>>> h = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999}
>>> round(float(step_sizes(None, 1, h, "optax")["step_size"]), 6)
0.000316

Reference: Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in
Observed Gradients" (NeurIPS 2020).
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas import nadam
from lrscope.formulas._common import Elementwise, bias_corrected

NAMES = ("adabelief",)

DEFAULTS: dict[str, dict[str, Any]] = {
    "optax": {"lr": None, "beta1": 0.9, "beta2": 0.999, "eps": 1e-16, "eps_root": 1e-16,
              "nesterov": False},
}


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``{"step_size": lr * sqrt(1 - beta2**t) / (1 - beta1**t)}``."""
    return {"step_size": h["lr"] * (1 - h["beta2"] ** t) ** 0.5 / (1 - h["beta1"] ** t)}


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta from ``exp_avg_var`` (s), d from ``exp_avg`` (and ``grad`` with Nesterov)."""
    root = xp.sqrt(bias_corrected(state["exp_avg_var"], 1 - h["beta2"] ** t))
    if h["nesterov"]:
        c_m, c_g = nadam.coefficients(t, h, "optax")
        direction = c_m * state["exp_avg"] + c_g * state["grad"]
    else:
        direction = state["exp_avg"] / (1 - h["beta1"] ** t)
    return Elementwise(eta=h["lr"] / (root + h["eps"]), direction=direction,
                       eps_dominated=root < h["eps"])
