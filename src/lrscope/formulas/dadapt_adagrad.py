r"""D-Adaptation AdaGrad (Defazio & Mishchenko, 2023): AdaGrad-style dual averaging.

``dadaptation.DAdaptAdaGrad``, step t, ``d`` the estimate as the step began, ``lr`` the
*first* group's lr, ``g' = g + wd * theta`` (in place), ``mu`` the momentum, ``c = 1 - mu``::

    dlr   = d * lr                                        # "step_size"
    a    <- a + g'**2                                     # alphak (starts at 1e-6)
    s    <- s + dlr * g'                                  # sk
    z     = x0 - s / (sqrt(a) + eps)
    theta <- z                   (mu = 0)   or   theta <- (1 - c) * theta + c * z

The position is recomputed from sums each step, so the step is not one gradient times a
factor; with ``D = sqrt(a) + eps`` after the step:

* ``eta = dlr / D`` (AdaGrad's effective lr);
* without momentum theta was ``z`` before the step, and
  ``d_dir = g' + (s_old / dlr) * (1 - D / D_old)``, with ``s_old = s - dlr * g'`` and
  ``D_old = sqrt(a - g'**2) + eps`` rebuilt from the state: ``-eta * d_dir`` is
  ``z - z_old`` exactly (the second term is dual averaging's pull of the old sum under
  the grown denominator);
* with momentum, ``theta_before = (theta - c * z) / (1 - c)`` and
  ``d_dir = c / (1 - c) * (theta - z) / eta``.

``decay_rate = 0`` (coupled).  Sparse gradients are not modelled.  Reported:
``step_size = dlr``, ``d`` (recorded before the step by ``watch()``), ``d_next``.
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas._common import Elementwise

NAMES = ("dadapt_adagrad",)
STEP_SCALARS = ("step_size",)
#: Hyperparameters that change every step, read from STEP_SCALARS in the state when there.
PER_STEP = ("d", "d_next")

DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {"lr": 1.0, "momentum": 0.0, "weight_decay": 0.0, "eps": 1e-6, "d": 1e-6,
              "d_next": 1e-6},
}


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``step_size = d * lr``, ``d``, ``d_next``."""
    return {"step_size": h["d"] * h["lr"], "d": h["d"], "d_next": h["d_next"]}


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta = dlr / (sqrt(alphak) + eps); d as in the module docstring."""
    dlr = state["step_size"] if "step_size" in state else step_sizes(xp, t, h, convention)["step_size"]
    a, s, grad, eps = state["alphak"], state["sk"], state["grad"], h["eps"]
    denom = xp.sqrt(a) + eps
    eta = dlr / denom
    c = 1 - h["momentum"]
    if c != 1:
        z = state["x0"] - s / denom
        return Elementwise(eta=eta, direction=c / (1 - c) * (state["param"] - z) / eta)
    s_old = s - dlr * grad
    denom_old = xp.sqrt(a - grad * grad) + eps
    return Elementwise(eta=eta, direction=grad + s_old / dlr * (1 - denom / denom_old))
