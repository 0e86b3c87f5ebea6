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
  Without ``param_rms_before`` (no hook saw the step) the scale ``s`` is recovered from
  theta after it, as for Keras: ``theta_before = (theta_after + s * rho_t * U_hat) / (1 -
  lr * wd)`` and ``mean(theta_before**2) = s**2`` is a quadratic in s (exact up to
  rounding; a root below eps2 means the scale was eps2).
* keras: ``rho_t = min(lr, 1 / sqrt(t))`` (``relative_step`` does not change it in
  Keras 3), RMS of theta *after* the decay, ``V`` (``exp_avg_sq``) stored in full, eps1
  added to g**2.  theta after the step gives that RMS without a copy: with
  ``s = RMS(theta_mid)`` and ``theta_mid = theta_after + s * rho_t * U_hat``,
  ``mean((theta_after + s rho U_hat)**2) = s**2`` is a quadratic in s; if its root is
  below eps2 the scale was eps2.  Needs the gradient (U depends on g).
* optax: ``rho_t = lr`` (no 1/sqrt(t); ``learning_rate=None`` means no lr at all, 1);
  factors the two largest dims, only if both are >= ``min_dim_size_to_factor`` (128):
  ``1/sqrt(V) = (v_row / mean(v_row))**-0.5 * v_col**-0.5``; scale
  ``max(1e-3, RMS(theta_before))``; clip ``max(1, RMS(U) / clipping_threshold)``; so
  ``eta = lr * scale / clip / sqrt(V)`` and ``d = g``, or with ``momentum`` (an EMA of
  the lr-scaled updates) ``d = ema / eta``; weight decay not scaled by lr
  (``decay_rate = weight_decay_rate``).  Uses the ``.mean`` method and
  ``xp.expand_dims`` (numpy and jax.numpy, the optax backend's namespace).

>>> step_sizes(np, np.array([1, 4, 10000]), {"lr": 1e-2}, "torch")["step_size"].tolist()
[0.01, 0.01, 0.01]
>>> step_sizes(np, np.array([10000]), {"lr": 0.1}, "torch")["step_size"].tolist()
[0.01]
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from lrscope.formulas._common import Elementwise
from lrscope.formulas.lamb import positive_root

NAMES = ("adafactor",)
#: eta needs whole-tensor reductions (RMS(U), the factored V): not computable chunk by chunk.
CHUNKABLE = False
#: The optax convention reads theta before the step in eta or d, so it cannot be
#: recovered from theta after the step through the model (see lrscope/optax/transform.py).
READS_PARAM_BEFORE = True

DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {"lr": 1e-2, "beta2_decay": -0.8, "eps": (None, 1e-3), "d": 1.0,
              "weight_decay": 0.0, "maximize": False},
    "keras": {"lr": 1e-3, "beta2_decay": -0.8, "eps": 1e-30, "eps2": 1e-3, "clip_threshold": 1.0,
              "relative_step": True, "weight_decay": 0.0},
    "optax": {"lr": None, "min_dim_size_to_factor": 128, "decay_rate": 0.8, "eps": 1e-30,
              "clipping_threshold": 1.0, "multiply_by_parameter_scale": True,
              "weight_decay": 0.0, "momentum": 0.0, "decay_offset": 0, "factored": True},
}


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``{"step_size": rho_t}``: ``min(lr, 1/sqrt(t))`` (torch, keras) or ``lr`` (optax)."""
    if convention == "optax":
        return {"step_size": h["lr"]}
    return {"step_size": xp.minimum(h["lr"], 1 / xp.sqrt(t * 1.0))}


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """torch convention: eta from the factored (or full) second moment and the clip.

    ``h["eps"]`` is ``(eps1, eps2)`` with eps1 already resolved (torch's default None
    means the parameter dtype's machine epsilon).
    """
    if convention == "keras":
        return _keras_elementwise(xp, state, t, h)
    if convention == "optax":
        return _optax_elementwise(xp, state, h)
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
    decay_rate = h["lr"] * h["weight_decay"]
    if "param_rms_before" in state:
        scale = max(eps2, float(state["param_rms_before"]))
    else:
        scale = _scale_from_param_after(xp, state["param"], rho * update / clip, 1 - decay_rate, eps2)
    return Elementwise(eta=scale * rho / clip * inv_root, direction=grad, decay_rate=decay_rate)


def _scale_from_param_after(xp: Any, after: Any, step: Any, kept: float, eps2: float) -> Any:
    """torch's ``max(eps2, RMS(theta_before))`` from theta after a step that subtracted
    ``scale * step`` from ``kept * theta_before``: the root of
    ``kept**2 * s**2 = mean((after + s * step)**2)``, at least eps2.  The root is unique
    while ``kept**2 > mean(step**2)``; past that (rho_t * d near 1, with the clip active)
    the scale is unknown: NaN."""
    n = max(after.numel(), 1)
    a = kept * kept - (step * step).sum() / n
    root = positive_root(xp, a, (after * step).sum() / n, (after * after).sum() / n)
    return xp.where(a > 0, xp.maximum(root, eps2 + 0 * root), root * float("nan"))


def _keras_elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any]
) -> Elementwise:
    """keras convention: ``eta = s * rho_t / (sqrt(V) * max(1, RMS(U) / clip))``, d = g."""
    rho = min(h["lr"], 1 / t**0.5)
    inv_root = 1 / xp.sqrt(state["exp_avg_sq"])
    update = state["grad"] * inv_root
    clip = xp.maximum(xp.sqrt(xp.mean(update * update)) / h["clip_threshold"], 1 + 0 * rho)
    clipped = update / clip
    after = state["param"]
    scale = positive_root(xp, 1 - rho * rho * xp.mean(clipped * clipped),
                          rho * xp.mean(after * clipped), xp.mean(after * after))
    scale = xp.maximum(scale, h["eps2"] + 0 * scale)
    return Elementwise(eta=scale * rho * inv_root / clip, direction=state["grad"],
                       decay_rate=h["lr"] * h["weight_decay"])


def _optax_factored_dims(shape: tuple[int, ...], h: Mapping[str, Any]) -> tuple[int, int] | None:
    """optax's choice: the two largest dims, if the second largest is big enough."""
    if not h["factored"] or len(shape) < 2:
        return None
    order = np.argsort(shape)
    if shape[order[-2]] < h["min_dim_size_to_factor"]:
        return None
    return int(order[-2]), int(order[-1])


def _optax_elementwise(xp: Any, state: Mapping[str, Any], h: Mapping[str, Any]) -> Elementwise:
    """optax convention: factored ``row_var``/``col_var`` (or ``variance``), theta before."""
    grad = state["grad"]
    dims = _optax_factored_dims(tuple(grad.shape), h)
    if dims is None:
        inv_root = state["variance"] ** -0.5
    else:
        d1, d0 = dims
        row, col = state["row_var"], state["col_var"]
        row_mean = row.mean(axis=d1 - 1 if d1 > d0 else d1, keepdims=True)
        inv_root = xp.expand_dims((row / row_mean) ** -0.5, d0) * xp.expand_dims(col**-0.5, d1)
    eta = (1.0 if h["lr"] is None else h["lr"]) * inv_root
    if h["clipping_threshold"] is not None:
        update = grad * inv_root
        rms = xp.sqrt((xp.abs(update) ** 2).mean())
        eta = eta / xp.maximum(1.0, rms / h["clipping_threshold"])
    if h["multiply_by_parameter_scale"]:
        theta = state["param_before"]
        eta = eta * xp.maximum(xp.sqrt((xp.abs(theta) ** 2).mean()), 1e-3)
    direction = state["momentum_buffer"] / eta if h["momentum"] else grad
    return Elementwise(eta=eta, direction=direction, decay_rate=h["weight_decay"] or 0.0)
