r"""D-Adaptation Adam (Defazio & Mishchenko, 2023): Adam whose step size ``d * lr`` adapts ``d``.

``dadaptation.DAdaptAdam``, step t (``group["k"]`` after the step), ``d`` the estimate
as the step began, ``lr`` the **largest** lr over the groups, ``r`` the group's
``layer_scale``, ``bc = sqrt(1 - beta2**t) / (1 - beta1**t)`` with
``use_bias_correction`` (else 1)::

    dlr   = d * lr * bc                                   # "step_size"
    m    <- beta1 * m + r * dlr * (1 - beta1) * g         # exp_avg: the step size is INSIDE m
    v    <- beta2 * v + (1 - beta2) * g**2                # exp_avg_sq
    theta <- theta * (1 - wd * dlr)                       # decouple=True
    theta <- theta - m / (sqrt(v) + eps)

As for Keras' SGD momentum (lr inside the buffer), ``d_dir = m / (r * dlr)``, the step
per unit step size (older step sizes stay inside m), and ``eta = r * dlr / (sqrt(v) + eps)``.
Coupled decay (the default ``decouple=False``) is added to g in place: it is inside m,
``decay_rate = 0``; decoupled ``decay_rate = wd * dlr``.  ``eps_dominated`` where
``sqrt(v) < eps``.

Reported: ``step_size = dlr``, ``d`` (the estimate the step applied: ``watch()``
records it before the step, which overwrites ``group["d"]``), ``d_next``.
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas._common import Elementwise
from lrscope.formulas.prodigy import bias_correction

NAMES = ("dadapt_adam",)
STEP_SCALARS = ("step_size",)
#: Hyperparameters that change every step, read from STEP_SCALARS in the state when there.
PER_STEP = ("d", "d_next")

DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {"lr": 1.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
              "decouple": False, "use_bias_correction": False, "layer_scale": 1.0, "d": 1e-6,
              "d_next": 1e-6},
}


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``step_size = d * lr * bc``, ``d``, ``d_next``."""
    return {"step_size": h["d"] * h["lr"] * bias_correction(t, h), "d": h["d"], "d_next": h["d_next"]}


def decay_rate(h: Mapping[str, Any], step_size: Any) -> Any:
    """``wd * dlr`` when decoupled."""
    return h["weight_decay"] * step_size if h["decouple"] else 0.0


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta = r * dlr / (sqrt(v) + eps), d = m / (r * dlr)."""
    dlr = state["step_size"] if "step_size" in state else step_sizes(xp, t, h, convention)["step_size"]
    scale = h["layer_scale"] * dlr
    root = xp.sqrt(state["exp_avg_sq"])
    return Elementwise(eta=scale / (root + h["eps"]), direction=state["exp_avg"] / scale,
                       decay_rate=decay_rate(h, dlr), eps_dominated=root < h["eps"])
