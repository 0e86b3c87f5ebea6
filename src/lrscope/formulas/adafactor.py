r"""Adafactor (Shazeer & Stern, 2018): factored second moments and a relative step.

The step on a tensor is ``alpha_t * U_hat`` with the update ``U = g / sqrt(V)`` (V the
factored or full second moment), clipped to ``U_hat = U / max(1, RMS(U) / d)``, and::

    alpha_t = rho_t * max(eps2, RMS(theta))          (multiply_by_parameter_scale)

``rho_t`` is the data-independent part reported as ``step_size``; the factor
``max(eps2, RMS(theta))`` depends on the parameters and is reported per tensor:

* torch: ``rho_t = min(lr, 1 / sqrt(t))``, RMS of theta *before* weight decay,
  decoupled decay ``theta *= 1 - rho_t * wd``; beta2_t = 1 - t**beta2_decay.
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

NAMES = ("adafactor",)

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
