r"""RAdam: Adam with the variance rectification of Liu et al. (2020).

With ``rho_inf = 2 / (1 - beta2) - 1`` and ``rho_t = rho_inf - 2 t beta2**t / (1 - beta2**t)``,
the step is rectified once the variance is tractable (torch: ``rho_t > 5``, which for
the usual beta2 = 0.999 happens from t = 6; optax: ``rho_t >= 5``)::

    r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
    rectified:   eta = lr * r_t / (sqrt(v_hat) + eps_hat),  step_size = lr * r_t * sqrt(1 - beta2**t) / (1 - beta1**t)
    otherwise:   eta = lr,                                  step_size = lr / (1 - beta1**t)

with ``d = m / (1 - beta1**t)`` always.  torch adds eps to the raw ``sqrt(v)``
(``eps_hat = eps / sqrt(1 - beta2**t)``); optax to ``sqrt(v_hat + eps_root)``.
torch's ``weight_decay`` is coupled unless ``decoupled_weight_decay``.

>>> h = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999}
>>> [bool(rectified(np, t, h, "torch")) for t in (5, 6)]
[False, True]
>>> round(float(step_sizes(np, 1, h, "torch")["step_size"]), 6)
0.01
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from lrscope.formulas._common import Elementwise, bias_corrected

NAMES = ("radam", "radamw")

_BASE = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.0}
DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {**_BASE, "eps": 1e-8, "decoupled_weight_decay": False, "maximize": False},
    "optax": {**_BASE, "lr": None, "eps": 1e-8, "eps_root": 0.0, "threshold": 5.0},
}


def _rho(t: Any, beta2: float) -> tuple[float, Any]:
    rho_inf = 2 / (1 - beta2) - 1
    return rho_inf, rho_inf - 2 * t * beta2**t / (1 - beta2**t)


def rectified(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> Any:
    """Whether step t uses the rectified (adaptive) update."""
    _, rho_t = _rho(t, h["beta2"])
    return rho_t >= h["threshold"] if convention == "optax" else rho_t > 5


def rectification(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> Any:
    """r_t where rectified, NaN-free 0 elsewhere."""
    rho_inf, rho_t = _rho(t, h["beta2"])
    ratio = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
    ok = rectified(xp, t, h, convention)
    return xp.where(ok, xp.abs(ratio) ** 0.5, 0 * ratio)


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``{"step_size": ...}`` in either regime (see the module docstring)."""
    bias1, bias2 = 1 - h["beta1"] ** t, 1 - h["beta2"] ** t
    r_t = rectification(xp, t, h, convention)
    adaptive = h["lr"] * r_t * bias2**0.5 / bias1
    return {"step_size": xp.where(rectified(xp, t, h, convention), adaptive, h["lr"] / bias1)}


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta from ``exp_avg_sq`` in the rectified regime, ``lr`` before it; d = m_hat."""
    bias1, bias2 = 1 - h["beta1"] ** t, 1 - h["beta2"] ** t
    v_hat = bias_corrected(state["exp_avg_sq"], bias2)
    if convention == "optax":
        root, eps_hat = xp.sqrt(v_hat + h["eps_root"]), h["eps"]
    else:
        root, eps_hat = xp.sqrt(v_hat), h["eps"] / bias2**0.5
    direction = bias_corrected(state["exp_avg"], bias1)
    decoupled = convention == "torch" and h["decoupled_weight_decay"] and h["weight_decay"] != 0
    decay = h["lr"] * h["weight_decay"] if decoupled else 0.0
    ok = rectified(xp, t, h, convention)
    if isinstance(ok, (bool, np.bool_)):  # a concrete step index: take its branch
        if not ok:
            return Elementwise(eta=h["lr"] + 0 * root, direction=direction, decay_rate=decay)
        r_t = float(rectification(np, t, h, convention))
        return Elementwise(eta=h["lr"] * r_t / (root + eps_hat), direction=direction,
                           decay_rate=decay, eps_dominated=root < eps_hat)
    # A traced step counter (inside jit): select elementwise, never branch in Python.
    adaptive = h["lr"] * rectification(xp, t, h, convention) / (root + eps_hat)
    return Elementwise(eta=xp.where(ok, adaptive, h["lr"] + 0 * root), direction=direction,
                       decay_rate=decay, eps_dominated=(root < eps_hat) & ok)
