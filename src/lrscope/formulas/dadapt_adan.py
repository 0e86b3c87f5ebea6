r"""D-Adaptation Adan (Defazio & Mishchenko, 2023): Adan whose step size ``d * lr`` adapts ``d``.

``dadaptation.DAdaptAdan``, step t (``group["k"]`` after the step), ``d`` the estimate as
the step began, ``lr`` the **first** group's lr and betas, ``g_prev`` the previous step's
gradient (``g`` at t = 1)::

    dlr   = d * lr                                                   # "step_size"
    m    <- beta1 * m + (1 - beta1) * dlr * g                        # exp_avg
    diff <- beta2 * diff + (1 - beta2) * dlr * (g - g_prev)          # exp_avg_diff
    n    <- beta3 * n + (1 - beta3) * (g + beta2 * (g - g_prev))**2  # exp_avg_sq
    theta <- theta - (m + beta2 * diff) / (sqrt(n) + eps)
    no_prox: theta *= 1 - dlr * wd   (before the update);   else theta /= 1 + dlr * wd   (after it)

No bias correction; the step size is INSIDE m and diff (as in ``lrscope.formulas.dadapt_adam``),
so ``d_dir = (m + beta2 * diff) / dlr``, the step per unit step size, and ``eta = dlr /
(sqrt(n) + eps)``; the proximal form divides by ``1 + r`` (``r = dlr * wd``) after the step:
``eta = dlr / ((1 + r) * (sqrt(n) + eps))`` and ``decay_rate = r / (1 + r)``
(``lrscope.formulas.adan``'s reading); ``no_prox``: ``decay_rate = r``.  Reported: ``step_size = dlr``, ``d`` (recorded
before the step by ``watch()``), ``d_next``.  ``eps_dominated`` where ``sqrt(n) < eps``.

>>> import numpy as np
>>> step_sizes(np, 3, {**DEFAULTS["torch"], "lr": 0.5, "d": 0.1}, "torch")["step_size"]
0.05
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas import adan
from lrscope.formulas._common import Elementwise
from lrscope.formulas.dadapt_adagrad import step_sizes  # d * lr, d, d_next

NAMES = ("dadapt_adan",)
STEP_SCALARS = ("step_size",)
#: Hyperparameters that change every step, read from STEP_SCALARS in the state when there.
PER_STEP = ("d", "d_next")

DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {"lr": 1.0, "beta1": 0.98, "beta2": 0.92, "beta3": 0.99, "eps": 1e-8, "weight_decay": 0.02,
              "no_prox": False, "d": 1e-6, "d_next": 1e-6},
}


def decay_rate(h: Mapping[str, Any], step_size: Any) -> Any:
    """``dlr * wd`` (``no_prox``), else ``r / (1 + r)`` for the proximal ``theta / (1 + r)``."""
    return adan.decay_rate({"lr": step_size, "weight_decay": h["weight_decay"], "no_prox": h["no_prox"]})


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta and d from ``exp_avg``, ``exp_avg_diff`` and ``exp_avg_sq``."""
    dlr = state["step_size"] if "step_size" in state else step_sizes(xp, t, h, convention)["step_size"]
    root = xp.sqrt(state["exp_avg_sq"])
    denom = root + h["eps"]
    shrink = 1 if h["no_prox"] else 1 + dlr * h["weight_decay"]
    direction = (state["exp_avg"] + h["beta2"] * state["exp_avg_diff"]) / dlr
    return Elementwise(eta=dlr / (shrink * denom), direction=direction, decay_rate=decay_rate(h, dlr),
                       eps_dominated=root < h["eps"])
