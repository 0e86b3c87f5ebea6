r"""AdEMAMix (Pagliardini et al., 2024): Adam plus a slow, *not* bias-corrected, momentum.

Step t (``pytorch_optimizer.AdEMAMix``: t is ``group["step"]``; bitsandbytes'
``AdEMAMix``/``AdEMAMix8bit``/``AdEMAMix32bit``: the tensor's ``state["step"]``)::

    m1 <- beta1 * m1 + (1 - beta1) * g             # exp_avg
    m2 <- beta3_t * m2 + (1 - beta3_t) * g         # exp_avg_slow (never bias-corrected)
    v  <- beta2 * v + (1 - beta2) * g**2           # exp_avg_sq
    theta <- theta * (1 - decay_lr * wd)
    theta <- theta - lr * (m1 / (1 - beta1**t) + alpha_t * m2) / (sqrt(v / (1 - beta2**t)) + eps)

so ``eta = lr / (sqrt(v_hat) + eps)`` (Adam's) and ``d = m1_hat + alpha_t * m2``.
``alpha_t = min(t * alpha / t_alpha, alpha)`` with a warmup ``t_alpha`` (pytorch_optimizer's
``t_alpha_beta3``), else ``alpha``; the schedule of beta3 acts inside m2 and needs no
modelling.  ``decay_lr``: None means ``lr``; pytorch_optimizer's ``fixed_decay`` 1; its
coupled decay (``weight_decouple=False``) is added to the gradient in place (it is in the
moments, ``decay_rate = 0``).  Reported: ``step_size = lr * sqrt(1 - beta2**t) / (1 -
beta1**t)`` (Adam's alpha_t, on m1) and ``alpha_t``; ``eps_dominated`` where
``sqrt(v_hat) < eps``.

>>> import numpy as np
>>> h = {**DEFAULTS["torch"], "lr": 1e-3, "t_alpha": 10}
>>> s = step_sizes(np, 4, h, "torch")
>>> round(float(s["step_size"]), 6), float(s["alpha_t"])
(0.000183, 2.0)
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from lrscope.formulas._common import Elementwise, bias_corrected, scaled_decay_rate as decay_rate

NAMES = ("ademamix",)

DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
              "alpha": 5.0, "t_alpha": None, "decay_lr": None},
}


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """Adam's alpha_t (on m1) and ``alpha_t``, the weight of m2."""
    alpha = h["alpha"] if not h["t_alpha"] else np.minimum(t * h["alpha"] / h["t_alpha"], h["alpha"])
    return {"step_size": h["lr"] * (1 - h["beta2"] ** t) ** 0.5 / (1 - h["beta1"] ** t), "alpha_t": alpha}


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta and d from ``exp_avg``, ``exp_avg_slow`` and ``exp_avg_sq``."""
    m1, m2 = state["exp_avg"], state["exp_avg_slow"]
    alpha = h["alpha"]
    if h["t_alpha"]:
        zero = 0 * m1  # min(t * alpha / t_alpha, alpha) with the common operations only
        alpha = -xp.maximum(zero - t * alpha / h["t_alpha"], zero - alpha)
    root = xp.sqrt(bias_corrected(state["exp_avg_sq"], 1 - h["beta2"] ** t))
    direction = bias_corrected(m1, 1 - h["beta1"] ** t) + alpha * m2
    return Elementwise(eta=h["lr"] / (root + h["eps"]), direction=direction, decay_rate=decay_rate(h),
                       eps_dominated=root < h["eps"])
