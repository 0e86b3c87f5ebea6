r"""AdamW with Nesterov momentum and a constant beta1 (``timm.optim.NAdamW``).

Step t (the tensor's ``state["step"]``), ``g'`` the gradient (``-g`` with ``maximize``)::

    theta <- theta * (1 - decay_lr * wd)                       # decoupled decay first
    m <- beta1 * m + (1 - beta1) * g'                           # exp_avg
    v <- beta2 * v + (1 - beta2) * g'**2                        # exp_avg_sq
    theta <- theta - lr / (1 - beta1**t) * (beta1 * m + (1 - beta1) * g') / (sqrt(v / (1 - beta2**t)) + eps)

so ``eta = lr / (sqrt(v_hat) + eps)`` (Adam's) and ``d = (beta1 * m + (1 - beta1) * g')
/ (1 - beta1**t)``: the Nesterov look-ahead of m, bias-corrected by ``1 - beta1**t``.

This is not torch's NAdam (``lrscope.formulas.nadam``): torch multiplies m and g by the
coefficients of a momentum schedule (``mu_t``, ``momentum_decay``), and optax's constant-
beta1 NAdam corrects m by ``1 - beta1**(t+1)``; timm's NAdamW corrects both terms by
``1 - beta1**t``.  ``decay_lr``: None means lr (timm's ``corrected_weight_decay``: ``lr**2 /
max_lr``).  Reported: ``step_size = lr * sqrt(1 - beta2**t) / (1 - beta1**t)``;
``eps_dominated`` where ``sqrt(v_hat) < eps``.

>>> import numpy as np
>>> round(float(step_sizes(np, 1, DEFAULTS["torch"], "torch")["step_size"]), 7)
0.0003162
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas import adam
from lrscope.formulas._common import Elementwise, bias_corrected, scaled_decay_rate as decay_rate

NAMES = ("adamw_nesterov",)

#: Adam's alpha_t: ``lr * sqrt(1 - beta2**t) / (1 - beta1**t)``.
step_sizes = adam.step_sizes

DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2,
              "maximize": False, "decay_lr": None},
}


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta from ``exp_avg_sq``, d from ``exp_avg`` and ``grad``."""
    beta1 = h["beta1"]
    grad = -state["grad"] if h["maximize"] else state["grad"]
    root = xp.sqrt(bias_corrected(state["exp_avg_sq"], 1 - h["beta2"] ** t))
    direction = bias_corrected(beta1 * state["exp_avg"] + (1 - beta1) * grad, 1 - beta1**t)
    return Elementwise(eta=h["lr"] / (root + h["eps"]), direction=direction, decay_rate=decay_rate(h),
                       eps_dominated=root < h["eps"])
