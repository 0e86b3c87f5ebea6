r"""Adan (Xie et al., 2022): Adam-like, with a second momentum of gradient differences.

Step t (``timm.optim.Adan``, ``pytorch_optimizer.Adan``; both keep ``t`` in
``group["step"]``), with ``g_prev`` the previous step's gradient (``g`` at t = 1)::

    m    <- beta1 * m + (1 - beta1) * g                             # exp_avg
    diff <- beta2 * diff + (1 - beta2) * (g - g_prev)               # exp_avg_diff
    n    <- beta3 * n + (1 - beta3) * (g + beta2 * (g - g_prev))**2  # exp_avg_sq
    denom = sqrt(n / (1 - beta3**t)) + eps

    theta <- theta - lr / (1 - beta1**t) * m / denom
                   - lr * beta2 / (1 - beta2**t) * diff / denom

One eta applies to both terms, so the step is ``-eta * d`` with

    eta = lr / denom,    d = m / (1 - beta1**t) + beta2 * diff / (1 - beta2**t)

Weight decay: ``no_prox=True`` (timm; pytorch_optimizer's ``weight_decouple=True``)
multiplies theta by ``1 - lr * wd`` first (``decay_rate = lr * wd``); the default, the
proximal form, divides theta by ``1 + lr * wd`` after the step, so
``theta_after = (theta - eta * d) / (1 + r)`` with ``r = lr * wd``: the step's eta is
``lr / ((1 + r) * denom)`` and ``decay_rate = r / (1 + r)``.

Reported: ``step_size = lr * sqrt(1 - beta3**t) / (1 - beta1**t)`` (on m, Adam's alpha_t)
and ``step_size_diff = lr * beta2 * sqrt(1 - beta3**t) / (1 - beta2**t)`` (on diff).
``eps_dominated`` where ``sqrt(n_hat) < eps``.  pytorch_optimizer's ``max_grad_norm``
clipping scales g before the moments, so it lives in m, diff and n and needs no modelling.

>>> import numpy as np
>>> h = {**DEFAULTS["torch"], "lr": 1e-3}
>>> s = step_sizes(np, 1, h, "torch")
>>> round(float(s["step_size"]), 6), round(float(s["step_size_diff"]), 6)
(0.005, 0.001149)
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas._common import Elementwise, bias_corrected

NAMES = ("adan",)

DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {"lr": 1e-3, "beta1": 0.98, "beta2": 0.92, "beta3": 0.99, "eps": 1e-8,
              "weight_decay": 0.0, "no_prox": False},
}


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``step_size`` (on m) and ``step_size_diff`` (on diff), see the module docstring."""
    root3 = (1 - h["beta3"] ** t) ** 0.5
    return {"step_size": h["lr"] * root3 / (1 - h["beta1"] ** t),
            "step_size_diff": h["lr"] * h["beta2"] * root3 / (1 - h["beta2"] ** t)}


def decay_rate(h: Mapping[str, Any], step_size: Any = None) -> Any:
    """``lr * wd`` (``no_prox``), else ``r / (1 + r)`` for the proximal ``theta / (1 + r)``."""
    rate = h["lr"] * h["weight_decay"]
    return rate if h["no_prox"] else rate / (1 + rate)


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta and d from ``exp_avg``, ``exp_avg_diff`` and ``exp_avg_sq``."""
    root = xp.sqrt(bias_corrected(state["exp_avg_sq"], 1 - h["beta3"] ** t))
    denom = root + h["eps"]
    direction = bias_corrected(state["exp_avg"], 1 - h["beta1"] ** t) + \
        h["beta2"] * bias_corrected(state["exp_avg_diff"], 1 - h["beta2"] ** t)
    shrink = 1 if h["no_prox"] else 1 + h["lr"] * h["weight_decay"]
    return Elementwise(eta=h["lr"] / (shrink * denom), direction=direction, decay_rate=decay_rate(h),
                       eps_dominated=root < h["eps"])
