r"""ADOPT (Taniguchi et al., 2024): the gradient is normalised *before* the momentum.

Step t (``timm.optim.Adopt``: t is the tensor's ``state["step"]``;
``pytorch_optimizer.ADOPT``: ``group["step"]``), with ``v`` the second moment *before*
the step and ``g'`` the gradient the step used (``-g`` with ``maximize``, plus
``wd * theta`` for coupled decay)::

    t = 1:  v <- g'**2                      (the parameters do not move)
    t > 1:  denom = max(sqrt(v), eps)        # clamp, not add (default eps 1e-6)
            m <- beta1 * m + (1 - beta1) * clip(g' / denom)       # exp_avg
            theta <- theta - lr * m
            v <- beta2 * v + (1 - beta2) * g'**2                  # after the update

The per-element learning rate acts on the gradient before the momentum, so it is not a
factor of the step's ``m``.  lrscope writes the step in the form of SPEC §1 with the
learning rate of *this* step's gradient::

    eta = lr / denom,    d = m * denom

``d`` is the momentum in gradient units (exactly Adam's momentum of raw gradients if
``v`` did not change), ``eta * d = lr * m`` is the step exactly, and eta's distribution
shows the per-element rate ``lr / max(sqrt(v), eps)`` the step gave its gradient;
``eps_dominated`` where ``sqrt(v) < eps`` (there the clamp sets the rate, ``lr / eps``).
The clip (``clip_exp``/``clip_lambda``) acts inside m and needs no modelling.  ``v``
before the step is recovered from the state after it as ``(v - (1 - beta2) g'**2) /
beta2`` (needs beta2 > 0), with ``theta_before = theta + lr * m`` for coupled decay.

Decoupled decay (``decoupled=True``; pytorch_optimizer's ``weight_decouple``) multiplies
theta by ``1 - decay_lr * wd`` first (``decay_lr``: None means lr; timm's
``corrected_weight_decay`` ``lr**2 / max_lr``; pytorch_optimizer's ``fixed_decay`` 1).
timm skips it at t = 1 with the rest of the step; pytorch_optimizer applies it at t = 1
too (``first_step_decay``).  ``step_size`` is lr, and 0 at t = 1.

>>> import numpy as np
>>> h = {**DEFAULTS["torch"], "lr": 0.1}
>>> v_before, g, m = np.array([4.0, 1e-14]), np.array([1.0, 1.0]), np.array([0.05, 0.1])
>>> v = 0.9999 * v_before + 0.0001 * g**2
>>> el = elementwise(np, {"exp_avg": m, "exp_avg_sq": v, "grad": g, "param": g}, 2, h, "torch")
>>> el.eta.round(6).tolist(), bool(np.allclose(el.eta * el.direction, 0.1 * m))
([0.05, 100000.0], True)
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas._common import Elementwise, scaled_decay_rate

NAMES = ("adopt",)

DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.9999, "eps": 1e-6, "weight_decay": 0.0,
              "decoupled": False, "decay_lr": None, "maximize": False, "first_step_decay": False},
}


def unsupported(h: Mapping[str, Any]) -> list[str]:
    """beta2 = 0: v before the step cannot be recovered from the state after it."""
    return ["betas[1]=0 (v before the step is not recoverable)"] if h["beta2"] == 0 else []


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``{"step_size": lr}`` from t = 2 on, 0 at t = 1 (the step only initialises v)."""
    return {"step_size": h["lr"] * (t > 1)}


def _decoupled_rate(h: Mapping[str, Any]) -> Any:
    return scaled_decay_rate(h) if h["decoupled"] else 0.0


def decay_rate(h: Mapping[str, Any], step_size: Any = None) -> Any:
    """``decay_lr * wd`` where decoupled (timm: not at t = 1, whose step size is 0)."""
    moved = h["first_step_decay"] or step_size is None or step_size != 0 or h["lr"] == 0
    return _decoupled_rate(h) if moved else 0.0


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta = lr / max(sqrt(v_before), eps), d = m * max(sqrt(v_before), eps) from
    ``exp_avg``, ``exp_avg_sq``, ``grad`` (and ``param`` for coupled decay)."""
    m, v, grad = state["exp_avg"], state["exp_avg_sq"], state["grad"]
    zero = 0 * m
    moved = 1 - xp.maximum(zero + (2 - t), zero)  # 0 at t = 1, else 1 (no branch on t)
    g = -grad if h["maximize"] else grad
    if not h["decoupled"] and h["weight_decay"] != 0:
        g = g + h["weight_decay"] * (state["param"] + h["lr"] * m)
    v_before = xp.maximum((v - (1 - h["beta2"]) * g * g) / h["beta2"], zero)
    root = xp.sqrt(v_before)
    denom = xp.maximum(root, zero + h["eps"])
    rate = _decoupled_rate(h)
    if not h["first_step_decay"] and rate != 0:
        rate = rate * moved
    return Elementwise(eta=moved * h["lr"] / denom, direction=m * denom, decay_rate=rate,
                       eps_dominated=root < h["eps"])
