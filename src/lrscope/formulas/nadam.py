r"""NAdam: Adam with Nesterov momentum and (torch, keras) a momentum schedule.

With ``v_hat = v / (1 - beta2**t)`` every convention takes the step

    theta <- theta * (1 - decay_rate) - eta * d,   eta = lr / (sqrt(v_hat) + eps)
    d = c_m * m + c_g * g'

where the two data-independent coefficients come from the momentum schedule mu_t:

* torch: ``mu_t = beta1 * (1 - 0.5 * 0.96**(t * momentum_decay))``, ``P_t = mu_1 ... mu_t``
  (``mu_product`` in the state), ``c_g = (1 - mu_t) / (1 - P_t)``,
  ``c_m = mu_{t+1} / (1 - P_t * mu_{t+1})``.  ``weight_decay`` is coupled L2 (in g')
  unless ``decoupled_weight_decay`` (then ``decay_rate = lr * wd``).
* keras: the same with ``mu_t = beta1 * (1 - 0.5 * 0.96**t)`` (no momentum_decay) and one
  product shared by all variables; weight decay decoupled.
* optax: constant ``mu = beta1``: ``c_m = beta1 / (1 - beta1**(t+1))``,
  ``c_g = (1 - beta1) / (1 - beta1**t)``, and ``eta = lr / (sqrt(v_hat + eps_root) + eps)``.

Both scalars are reported: ``step_size = lr * sqrt(1 - beta2**t) * c_m`` (on m, the
Adam-like alpha_t) and ``step_size_grad = lr * sqrt(1 - beta2**t) * c_g`` (on g).

>>> s = step_sizes(np, 1, resolve_hyper("torch", {}), "torch")
>>> round(float(s["step_size"]), 6), round(float(s["step_size_grad"]), 6)
(3.6e-05, 6.3e-05)
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from lrscope.formulas._common import Elementwise, bias_corrected, coupled_direction, is_zero, power, resolve

NAMES = ("nadam", "nadamw")

_BASE = {"beta1": 0.9, "beta2": 0.999, "weight_decay": 0.0}
DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {**_BASE, "lr": 2e-3, "eps": 1e-8, "momentum_decay": 4e-3,
              "decoupled_weight_decay": False, "maximize": False},
    "keras": {**_BASE, "lr": 1e-3, "eps": 1e-7},
    "optax": {**_BASE, "lr": None, "eps": 1e-8, "eps_root": 0.0},
}


def resolve_hyper(convention: str, hyper: Mapping[str, Any]) -> dict[str, Any]:
    return resolve("nadam", DEFAULTS, convention, hyper)


def _mu(t: Any, h: Mapping[str, Any], convention: str) -> Any:
    exponent = t * h["momentum_decay"] if convention == "torch" else t
    return h["beta1"] * (1 - 0.5 * 0.96**exponent)


def mu_product(t: int, h: Mapping[str, Any], convention: str) -> float:
    """``P_t = mu_1 * ... * mu_t`` of the torch / keras momentum schedule."""
    return float(np.prod([_mu(i, h, convention) for i in range(1, int(t) + 1)]))


def _products(t: Any, h: Mapping[str, Any], convention: str, block: int = 1 << 16) -> Any:
    """``P_t`` for each t (an int or an array of ints), multiplied in order as the frameworks
    do, a block of steps at a time; once mu_i rounds to beta1 (0.96**(i * momentum_decay)
    below the float's precision: after about 230,000 steps with torch's default), the rest
    is ``P_i * beta1**(t - i)``, so neither time nor memory grow with t beyond that."""
    wanted = np.asarray(t).ravel()
    out = np.empty(wanted.shape)
    product, done, top = 1.0, 0, int(wanted.max())
    while done < top:
        mu = _mu(np.arange(done + 1, min(done + block, top) + 1), h, convention)
        if np.all(mu == h["beta1"]):
            break
        products = np.cumprod(np.concatenate(([product], mu)))[1:]
        inside = (wanted > done) & (wanted <= done + mu.size)
        out[inside] = products[wanted[inside] - done - 1]
        product, done = float(products[-1]), done + mu.size
    beyond = wanted > done
    out[beyond] = product * h["beta1"] ** (wanted[beyond] - done).astype(float)
    return out.reshape(np.shape(t)) if np.ndim(t) else float(out[0])


def coefficients(t: Any, h: Mapping[str, Any], convention: str, product: Any = None) -> tuple[Any, Any]:
    """``(c_m, c_g)`` of step t; ``product`` is P_t when the caller has it from the state."""
    if convention == "optax":
        b1 = h["beta1"]
        return b1 / (1 - b1 ** (t + 1)), (1 - b1) / (1 - b1**t)
    if product is None:
        product = _products(t, h, convention)
    mu_t, mu_next = _mu(t, h, convention), _mu(t + 1, h, convention)
    return mu_next / (1 - product * mu_next), (1 - mu_t) / (1 - product)


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``step_size`` (on m) and ``step_size_grad`` (on g), see the module docstring."""
    c_m, c_g = coefficients(t, h, convention)
    root_bias2 = (1 - h["beta2"] ** t) ** 0.5
    return {"step_size": h["lr"] * root_bias2 * c_m, "step_size_grad": h["lr"] * root_bias2 * c_g}


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta from ``exp_avg_sq``; d from ``exp_avg``, ``grad`` and ``mu_product`` (torch, keras)."""
    bias2 = 1 - power(state, h, "beta2", t)
    v_hat = bias_corrected(state["exp_avg_sq"], bias2)
    root = xp.sqrt(v_hat + h["eps_root"]) if convention == "optax" else xp.sqrt(v_hat)
    eta = h["lr"] / (root + h["eps"])
    # (c_m, c_g in the state: computed once per step by the caller, see _common.power)
    c_m, c_g = (state["c_m"], state["c_g"]) if "c_m" in state else \
        coefficients(t, h, convention, state.get("mu_product"))
    coupled = convention == "torch" and not h["decoupled_weight_decay"]
    wd = h["weight_decay"]
    direction = coupled_direction(
        xp, state.get("param"), state["grad"], eta, c_g, c_m * state["exp_avg"],
        wd if coupled else 0.0, h.get("maximize", False),
    )
    decay = 0.0 if coupled or is_zero(wd) else h["lr"] * wd
    return Elementwise(eta=eta, direction=direction, decay_rate=decay, eps_dominated=root < h["eps"])
