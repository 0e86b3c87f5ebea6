r"""Adamax: Adam with an infinity-norm second moment.

``u`` is the exponentially weighted infinity norm, ``d = m / (1 - beta1**t)`` and
``step_size = lr / (1 - beta1**t)``:

* torch / optax: ``u <- max(beta2 * u, |g| + eps)``, ``eta = lr / u``
  (eps lives inside u; ``eps_dominated`` where ``u < 2 * eps``, i.e. eps is at least
  half of the denominator);
* keras: ``u <- max(beta2 * u, |g|)``, ``eta = lr / (u + eps)`` (``eps_dominated`` where
  ``u < eps``).

Weight decay is decoupled (``decay_rate = lr * wd``) in keras and optax ``adamaxw``.

>>> round(step_sizes(None, 1, {"lr": 2e-3, "beta1": 0.9}, "torch")["step_size"], 6)
0.02
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas._common import Elementwise, bias_corrected, power

NAMES = ("adamax",)

_BASE = {"beta1": 0.9, "beta2": 0.999, "weight_decay": 0.0}
DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {**_BASE, "lr": 2e-3, "eps": 1e-8, "maximize": False},
    "keras": {**_BASE, "lr": 1e-3, "eps": 1e-7},
    "optax": {**_BASE, "lr": None, "eps": 1e-8},
}


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``{"step_size": lr / (1 - beta1**t)}``."""
    return {"step_size": h["lr"] / (1 - h["beta1"] ** t)}


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta from the infinity norm ``exp_inf``; d = bias-corrected ``exp_avg``."""
    u, eps = state["exp_inf"], h["eps"]
    if convention == "keras":
        eta, dominated = h["lr"] / (u + eps), u < eps
    else:
        eta, dominated = h["lr"] / u, u < 2 * eps
    decay = h["lr"] * h["weight_decay"] if convention in ("keras", "optax") else 0.0
    return Elementwise(eta=eta, direction=bias_corrected(state["exp_avg"], 1 - power(state, h, "beta1", t)),
                       decay_rate=decay, eps_dominated=dominated)
