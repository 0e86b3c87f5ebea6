r"""MARS (Yuan et al., 2024): variance-reduced gradients in an AdamW (or Lion) step.

``timm.optim.Mars``, step t (the tensor's ``state["step"]``), for a tensor with at least
two dimensions (or every tensor with ``optimize_1d``)::

    c = g + gamma * beta1 / (1 - beta1) * (g - g_prev)     # g at t = 1
    c = c / max(1, ||c||)
    m <- beta1 * m + (1 - beta1) * c                       # exp_avg
    "adamw": v <- beta2 * v + (1 - beta2) * c**2            # exp_avg_sq
             theta <- theta - lr * (wd * theta + m_hat / (sqrt(v_hat) + eps))
    "lion":  theta <- theta - lr * (wd * theta + sign(m))

with ``m_hat = m / (1 - beta1**t)``, ``v_hat = v / (1 - beta2**t)``.  The variance
reduction and the clip act inside m and v, so the step has Adam's (Lion's) form:

    "adamw": eta = lr / (sqrt(v_hat) + eps),  d = m_hat
    "lion":  eta = lr,                        d = sign(m)       (m after the step)

and ``decay_rate = lr * wd``.  Other tensors (1-D, without ``optimize_1d``) take a plain
AdamW step with ``betas_1d`` and the lr ``lr * lr_1d_factor``: there ``eta = lr *
lr_1d_factor / (sqrt(v_hat) + eps)``, ``d = m_hat`` and ``decay_rate = lr * lr_1d_factor *
wd`` (the group's reported ``weight_decay_rate`` is that of the matrices, ``lr * wd``).
Which rule a tensor took is its shape's: the state hook passes ``matrix``.  Reported:
``step_size = lr * sqrt(1 - beta2**t) / (1 - beta1**t)`` ("adamw"; "lion": lr).

>>> import numpy as np
>>> h = {**DEFAULTS["torch"], "lr": 3e-3}
>>> m, v = np.array([0.1, -0.2]), np.array([0.01, 0.04])
>>> el = elementwise(np, {"exp_avg": m, "exp_avg_sq": v, "matrix": True}, 1, h, "torch")
>>> el.direction.round(3).tolist()     # m / (1 - beta1)
[1.0, -2.0]
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas._common import Elementwise

NAMES = ("mars",)
#: Which rule a tensor takes depends on its shape (``matrix`` from the state hook).
CHUNKABLE = False
TYPES = ("adamw", "lion")

DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {"lr": 3e-3, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.0,
              "gamma": 0.025, "mars_type": "adamw", "optimize_1d": False, "lr_1d_factor": 1.0,
              "betas_1d": None},
}


def unsupported(h: Mapping[str, Any]) -> list[str]:
    """A ``mars_type`` other than "adamw" and "lion"."""
    return [] if h["mars_type"] in TYPES else [f"mars_type={h['mars_type']!r}"]


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """Adam's alpha_t ("adamw") or lr ("lion"), of the matrices' rule."""
    if h["mars_type"] == "lion":
        return {"step_size": h["lr"]}
    return {"step_size": h["lr"] * (1 - h["beta2"] ** t) ** 0.5 / (1 - h["beta1"] ** t)}


def decay_rate(h: Mapping[str, Any], step_size: Any = None) -> Any:
    """``lr * wd`` (the matrices' rule)."""
    return h["lr"] * h["weight_decay"]


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta and d from ``exp_avg`` (and ``exp_avg_sq``), by the rule of ``matrix``."""
    m = state["exp_avg"]
    if state["matrix"] or h["optimize_1d"]:
        lr, (beta1, beta2) = h["lr"], (h["beta1"], h["beta2"])
        if h["mars_type"] == "lion":
            return Elementwise(eta=lr + 0 * m, direction=xp.sign(m), decay_rate=lr * h["weight_decay"])
    else:
        lr, (beta1, beta2) = h["lr"] * h["lr_1d_factor"], h["betas_1d"] or (h["beta1"], h["beta2"])
    root = xp.sqrt(state["exp_avg_sq"] / (1 - beta2**t))
    return Elementwise(eta=lr / (root + h["eps"]), direction=m / (1 - beta1**t),
                       decay_rate=lr * h["weight_decay"], eps_dominated=root < h["eps"])
