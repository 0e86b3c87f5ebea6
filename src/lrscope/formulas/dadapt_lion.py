r"""D-Adaptation Lion (Defazio & Mishchenko, 2023): Lion whose step size ``d * lr`` adapts ``d``.

``dadaptation.DAdaptLion``, step t (``group["k"]`` after the step), ``d`` the estimate as
the step began, ``lr`` the **largest** lr over the groups (a group's lr is that lr or 0, and
a group of lr 0 moves too), the first group's betas::

    dlr   = d * lr                                        # "step_size"
    theta <- theta * (1 - dlr * wd)
    theta <- theta - dlr * sign(beta1 * m + (1 - beta1) * g)
    m    <- beta2 * m + (1 - beta2) * dlr * g             # exp_avg: the step size is INSIDE m

so ``eta = dlr`` for every element, ``d_dir = sign(beta1 * m_before + (1 - beta1) * g)``
(Lion's, ``lrscope.formulas.lion``) with ``m_before = (m - (1 - beta2) * dlr * g) / beta2``
recovered from the state after the step, and ``decay_rate = dlr * wd``.  Reported:
``step_size = dlr``, ``d`` (recorded before the step by ``watch()``: the step overwrites
``group["d"]``), ``d_next``.

>>> import numpy as np
>>> h = {**DEFAULTS["torch"], "lr": 1.0, "d": 0.5}
>>> g = np.array([1.0, -2.0])
>>> el = elementwise(np, {"exp_avg": (1 - 0.99) * 0.5 * g, "grad": g}, 1, h, "torch")
>>> el.eta.tolist(), el.direction.tolist()
([0.5, 0.5], [1.0, -1.0])
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas._common import Elementwise
from lrscope.formulas.dadapt_adagrad import step_sizes  # d * lr, d, d_next

NAMES = ("dadapt_lion",)
STEP_SCALARS = ("step_size",)
#: Hyperparameters that change every step, read from STEP_SCALARS in the state when there.
PER_STEP = ("d", "d_next")

DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {"lr": 1.0, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.0, "d": 1e-6, "d_next": 1e-6},
}


def decay_rate(h: Mapping[str, Any], step_size: Any) -> Any:
    """``dlr * wd``."""
    return step_size * h["weight_decay"]


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta = dlr, d = the sign vector the step used."""
    dlr = state["step_size"] if "step_size" in state else step_sizes(xp, t, h, convention)["step_size"]
    grad, beta1, beta2 = state["grad"], h["beta1"], h["beta2"]
    before = (state["exp_avg"] - (1 - beta2) * dlr * grad) / beta2
    return Elementwise(eta=dlr + 0 * grad, direction=xp.sign(beta1 * before + (1 - beta1) * grad),
                       decay_rate=decay_rate(h, dlr))
