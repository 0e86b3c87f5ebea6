r"""Adam, AdamW and AMSGrad.

Update rule (step t, m and v the first and second moments after the step)::

    m_hat = m / (1 - beta1**t)                 # the direction d
    v_hat = v / (1 - beta2**t)                 # AMSGrad: v replaced by its running max
    theta <- theta * (1 - lr * wd_decoupled) - eta * m_hat

with the effective learning rate and the data-independent step size

    eta     = lr / (sqrt(v_hat) + eps_hat)
    alpha_t = lr * sqrt(1 - beta2**t) / (1 - beta1**t)      # "step_size"

Conventions (they differ only in where eps goes and what AMSGrad maximises):

* torch / optax: ``eps_hat = eps`` (optax also adds ``eps_root`` inside the sqrt);
  AMSGrad in torch keeps the max of raw v, optax the max of v_hat
  (the same thing once divided by ``1 - beta2**t``, up to rounding).
* keras / tf1: eps is added to the raw ``sqrt(v)``, so ``eps_hat = eps / sqrt(1 - beta2**t)``
  ("epsilon hat" of Kingma & Ba's section 2); default eps is 1e-7 (keras) / 1e-8 (tf1).

Weight decay: torch ``Adam(weight_decay=)`` is coupled L2 (added to g, so it lives in
m and v and ``decay_rate = 0``); ``AdamW`` / ``decoupled_weight_decay=True`` and Keras
remove ``lr * wd`` of theta before the moment update; optax ``adamw`` adds
``lr * wd * theta`` to the update.  Either way ``decay_rate = lr * wd`` for the decoupled
forms.  ``eps_dominated`` marks elements where ``eps_hat > sqrt(v_hat)``.

>>> import numpy as np
>>> round(float(step_sizes(np, 1, resolve_hyper("torch", {}), "torch")["step_size"]), 6)
0.000316
>>> float(step_sizes(np, 10, resolve_hyper("torch", {}), "torch")["step_size"]) < 0.16e-3
True

References: Kingma & Ba, "Adam" (2015); Loshchilov & Hutter, "Decoupled Weight Decay
Regularization" (2019); Reddi et al., "On the Convergence of Adam and Beyond" (2018).
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas._common import Elementwise, bias_corrected, is_zero, power, resolve

NAMES = ("adam", "adamw", "amsgrad", "sparse_adam")

_BASE = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.0, "amsgrad": False,
         "decoupled_weight_decay": False}
DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {**_BASE, "eps": 1e-8, "maximize": False},
    "keras": {**_BASE, "eps": 1e-7, "decoupled_weight_decay": True},
    "tf1": {**_BASE, "eps": 1e-8},
    "optax": {**_BASE, "lr": None, "eps": 1e-8, "eps_root": 0.0, "decoupled_weight_decay": True},
}


def resolve_hyper(convention: str, hyper: Mapping[str, Any]) -> dict[str, Any]:
    return resolve("adam", DEFAULTS, convention, hyper)


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``{"step_size": lr * sqrt(1 - beta2**t) / (1 - beta1**t)}`` (same in every convention)."""
    return {"step_size": h["lr"] * (1 - h["beta2"] ** t) ** 0.5 / (1 - h["beta1"] ** t)}


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta and d of the step just taken from ``exp_avg``/``exp_avg_sq`` (or ``max_exp_avg_sq``).

    ``state`` may carry ``beta1_power``/``beta2_power`` (beta**t of this step): where the
    framework accumulates them in variables (TF1), so eta matches its own rounding, or
    where a caller computes them once per step rather than per element (compiled loops).
    """
    bias1, bias2 = 1 - power(state, h, "beta1", t), 1 - power(state, h, "beta2", t)
    v = state["max_exp_avg_sq"] if h["amsgrad"] else state["exp_avg_sq"]
    if convention == "optax":
        # optax's AMSGrad keeps the max of the already bias-corrected v_hat.
        root = xp.sqrt((v if h["amsgrad"] else bias_corrected(v, bias2)) + h["eps_root"])
        eps_hat = h["eps"]
    else:
        root = xp.sqrt(bias_corrected(v, bias2))
        eps_hat = h["eps"] / bias2**0.5 if convention in ("keras", "tf1") else h["eps"]
    decoupled = h["decoupled_weight_decay"] and not is_zero(h["weight_decay"])
    return Elementwise(
        eta=h["lr"] / (root + eps_hat),
        direction=bias_corrected(state["exp_avg"], bias1),
        decay_rate=h["lr"] * h["weight_decay"] if decoupled else 0.0,
        eps_dominated=root < eps_hat,
    )
