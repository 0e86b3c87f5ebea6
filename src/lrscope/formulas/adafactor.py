r"""Adafactor (Shazeer & Stern, 2018): factored second moments and a relative step.

The step on a tensor is ``alpha_t * U_hat`` with the update ``U = g / sqrt(V)`` (V the
factored or full second moment), clipped to ``U_hat = U / max(1, RMS(U) / d)``, and::

    alpha_t = rho_t * max(eps2, RMS(theta))          (multiply_by_parameter_scale)

``rho_t`` is the data-independent part reported as ``step_size``; the factor
``max(eps2, RMS(theta))`` depends on the parameters and is reported per tensor:

* torch: ``rho_t = min(lr, 1 / sqrt(t))``, RMS of theta *before* the step (the backend
  records it as ``param_rms_before``), decoupled decay ``theta *= 1 - lr * wd`` (lr, not
  rho_t, as torch's source does); ``V`` is ``row_var @ col_var / mean(row_var)`` for
  tensors of 2 or more dims, else ``variance``, clamped below at ``eps1**2``; the clip
  uses ``max(1, RMS(U) / d)``.  So ``d = g`` and
  ``eta = rho_t * max(eps2, RMS(theta_before)) / max(1, RMS(U) / d) / sqrt(V)``.
* keras: ``rho_t = min(lr, 1 / sqrt(t))``; RMS of theta after the decay.
* optax: ``rho_t = lr`` (no 1/sqrt(t)); factors the two largest dims, only if both
  are >= ``min_dim_size_to_factor`` (128); weight decay not scaled by lr.

>>> step_sizes(np, np.array([1, 4, 10000]), {"lr": 1e-2}, "torch")["step_size"].tolist()
[0.01, 0.01, 0.01]
>>> step_sizes(np, np.array([10000]), {"lr": 0.1}, "torch")["step_size"].tolist()
[0.01]
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from lrscope.formulas._common import Elementwise

NAMES = ("adafactor",)
#: eta needs whole-tensor reductions (RMS(U), the factored V): not computable chunk by chunk.
CHUNKABLE = False

DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {"lr": 1e-2, "beta2_decay": -0.8, "eps": (None, 1e-3), "d": 1.0,
              "weight_decay": 0.0, "maximize": False},
    "keras": {"lr": 1e-3, "beta2_decay": -0.8, "eps": 1e-30, "eps2": 1e-3, "clip_threshold": 1.0,
              "relative_step": True, "weight_decay": 0.0},
    "optax": {"lr": None, "min_dim_size_to_factor": 128, "decay_rate": 0.8, "eps": 1e-30,
              "clipping_threshold": 1.0, "multiply_by_parameter_scale": True,
              "weight_decay": 0.0},
}


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``{"step_size": rho_t}``: ``min(lr, 1/sqrt(t))`` (torch, keras) or ``lr`` (optax)."""
    if convention == "optax" or (convention == "keras" and not h["relative_step"]):
        return {"step_size": h["lr"]}
    return {"step_size": xp.minimum(h["lr"], 1 / xp.sqrt(t * 1.0))}


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """torch convention: eta from the factored (or full) second moment and the clip.

    ``h["eps"]`` is ``(eps1, eps2)`` with eps1 already resolved (torch's default None
    means the parameter dtype's machine epsilon).
    """
    if convention != "torch":
        raise ValueError(f"adafactor elementwise is not available for the {convention} convention")
    eps1, eps2 = h["eps"]
    grad = -state["grad"] if h["maximize"] else state["grad"]
    if state.get("row_var") is not None and grad.ndim > 1:
        row, col = state["row_var"], state["col_var"]
        row_mean = row.sum(-2, keepdim=True) / row.shape[-2]
        variance = (row @ col) / xp.maximum(row_mean, 0 * row_mean + eps1)
    else:
        variance = state["variance"]
    inv_root = 1 / xp.sqrt(xp.maximum(variance, 0 * variance + eps1 * eps1))
    update = inv_root * grad
    rms_update = xp.sqrt((update * update).sum() / max(update.numel(), 1))
    clip = xp.maximum(rms_update / h["d"], 0 * rms_update + 1.0)
    rho = min(h["lr"], 1 / t**0.5)
    alpha = max(eps2, float(state["param_rms_before"])) * rho
    return Elementwise(eta=alpha / clip * inv_root, direction=grad, decay_rate=h["lr"] * h["weight_decay"])
