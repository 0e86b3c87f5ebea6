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
Which rule a tensor took is its shape's: the state hook passes ``matrix``.

``pytorch_optimizer.MARS`` (t in ``group["step"]``) takes the same steps, with eps added to
``sqrt(v + 1e-15)`` before the bias correction (``raw_eps``, ``eps_root``), the 1-D
tensors' own decay ``weight_decay_1d``, and ``fixed_decay`` (the decay not scaled by lr);
its ``mars_type="shampoo"`` is not modelled.  Reported:
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

from lrscope.formulas._common import Elementwise, bias_corrected, second_moment_root

NAMES = ("mars",)
#: Which rule a tensor takes depends on its shape (``matrix`` from the state hook).
CHUNKABLE = False
TYPES = ("adamw", "lion")

DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {"lr": 3e-3, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.0,
              "gamma": 0.025, "mars_type": "adamw", "optimize_1d": False, "lr_1d_factor": 1.0,
              "betas_1d": None, "weight_decay_1d": None, "fixed_decay": False, "raw_eps": False,
              "eps_root": 0.0},
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
    """``lr * wd`` (the matrices' rule; ``fixed_decay``: ``wd``)."""
    return _decay(h, h["lr"], h["weight_decay"])


def _decay(h: Mapping[str, Any], lr: Any, weight_decay: Any) -> Any:
    return (1.0 if h["fixed_decay"] else lr) * weight_decay


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta and d from ``exp_avg`` (and ``exp_avg_sq``), by the rule of ``matrix``."""
    m = state["exp_avg"]
    if state["matrix"] or h["optimize_1d"]:
        lr, (beta1, beta2), wd = h["lr"], (h["beta1"], h["beta2"]), h["weight_decay"]
        if h["mars_type"] == "lion":
            return Elementwise(eta=lr + 0 * m, direction=xp.sign(m), decay_rate=_decay(h, lr, wd))
    else:
        lr, (beta1, beta2) = h["lr"] * h["lr_1d_factor"], h["betas_1d"] or (h["beta1"], h["beta2"])
        wd = h["weight_decay"] if h["weight_decay_1d"] is None else h["weight_decay_1d"]
    root, eps_hat = second_moment_root(xp, state["exp_avg_sq"], 1 - beta2**t, h)
    return Elementwise(eta=lr / (root + eps_hat), direction=bias_corrected(m, 1 - beta1**t),
                       decay_rate=_decay(h, lr, wd), eps_dominated=root < eps_hat)
