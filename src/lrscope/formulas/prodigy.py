r"""Prodigy (Mishchenko & Defazio, 2024): Adam whose step size ``d * lr`` adapts ``d``.

``prodigyopt.Prodigy`` (konstmish/prodigy), step t (``group["k"]`` after the step):
with ``d`` the estimate as the step began and ``d'`` the one it computes on the way,
``lr`` the **largest** lr over the parameter groups (a group's own lr only says whether
its moments move: 0 or that maximum), and ``bc = sqrt(1 - beta2**t) / (1 - beta1**t)``
with ``use_bias_correction`` (else 1)::

    dlr   = d * lr * bc                                      # "step_size"
    m    <- beta1 * m + d * (1 - beta1) * g                  # exp_avg (d inside the moments)
    v    <- beta2 * v + d**2 * (1 - beta2) * g**2            # exp_avg_sq
    theta <- theta * (1 - wd * dlr)                          # decouple=True (the default)
    theta <- theta - dlr * m / (sqrt(v) + d' * eps)          # the denominator uses the NEW d'

so ``d_dir = m`` (``exp_avg``) and ``eta = dlr / (sqrt(v) + d' * eps)``; with ``beta1 = 0``
there is no m, ``d_dir = g`` and ``eta = dlr * d' / (sqrt(v) + d' * eps)``.  Coupled
decay (``decouple=False``) is added to g in place, so it is inside ``m`` and ``grad``
(``decay_rate = 0``); decoupled ``decay_rate = wd * dlr``.  ``eps_dominated`` where
``sqrt(v) < d' * eps``.

Reported scalars: ``step_size = dlr``, ``d`` (the estimate the step applied), ``d_next``
(``group["d"]`` after the step: the next step's estimate, already in this step's
denominator).  The step changes ``group["d"]``, so ``d`` comes from ``watch()``'s
pre-step record (``inspect()`` knows it only at t = 1, where it is ``d0``).

Optax (``optax.contrib.prodigy``, ``ProdigyState``): the same step with
``use_bias_correction`` always on, ``d`` the state's ``estim_lr`` before the step and
``d'`` after it, the lr the schedule at ``count - 1``, and::

    dlr    = asarray(estim_lr * lr * bc, dtype=estim_lr.dtype)   # "step_size"
    update = -weight_decay * dlr * theta - dlr * m / (sqrt(v) + estim_lr' * eps)

with ``m``, ``v`` as above (``d`` inside both).  ``d_dir = m`` for every beta1 (with
beta1 = 0 optax's ``m`` is ``d * g``), ``decay_rate = wd * dlr``.  ``beta3``,
``estim_lr0``, ``estim_lr_coef`` and ``safeguard_warmup`` only change the estimate.

The d estimate's own options (``d0``, ``d_coef``, ``growth_rate``, ``beta3``,
``safeguard_warmup``, ``slice_p``, ``fsdp_in_use``) change ``d``, not the step given
``d``: they need no modelling.

>>> import numpy as np
>>> h = {**DEFAULTS["torch"], "d": 1e-6, "d_next": 2e-6, "use_bias_correction": True}
>>> round(float(step_sizes(np, 1, h, "torch")["step_size"]), 12)  # d * lr * sqrt(0.001) / 0.1
3.16e-07
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas._common import Elementwise

NAMES = ("prodigy",)
#: Passed with the state by readers (computed once per step, as Prodigy computes them).
STEP_SCALARS = ("step_size", "d_next")
#: Hyperparameters that change every step, read from STEP_SCALARS in the state when there.
PER_STEP = ("d", "d_next")

DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {"lr": 1.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
              "decouple": True, "use_bias_correction": False, "d": 1e-6, "d_next": 1e-6},
    # optax.contrib.prodigy's arguments (betas split into beta1/beta2); bias correction
    # and decoupled decay are not options there.
    "optax": {"lr": 1.0, "beta1": 0.9, "beta2": 0.999, "beta3": None, "eps": 1e-8,
              "estim_lr0": 1e-6, "estim_lr_coef": 1.0, "weight_decay": 0.0,
              "safeguard_warmup": False, "decouple": True, "use_bias_correction": True,
              "d": 1e-6, "d_next": 1e-6},
}


def bias_correction(t: Any, h: Mapping[str, Any]) -> Any:
    """``sqrt(1 - beta2**t) / (1 - beta1**t)`` with ``use_bias_correction``, else 1."""
    if not h["use_bias_correction"]:
        return 1
    return ((1 - h["beta2"] ** t) ** 0.5) / (1 - h["beta1"] ** t)


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``step_size = d * lr * bc`` (in Prodigy's order of operations), ``d``, ``d_next``;
    optax rounds it to the dtype of its estimate."""
    step_size = h["d"] * h["lr"] * bias_correction(t, h)
    if convention == "optax" and hasattr(h["d"], "dtype"):
        step_size = xp.asarray(step_size, dtype=h["d"].dtype)
    return {"step_size": step_size, "d": h["d"], "d_next": h["d_next"]}


def decay_rate(h: Mapping[str, Any], step_size: Any) -> Any:
    """``wd * dlr`` when decoupled; coupled decay lives in the gradient."""
    return h["weight_decay"] * step_size if h["decouple"] else 0.0


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta and d from ``exp_avg``/``exp_avg_sq`` (``grad`` where beta1 = 0), the step size
    and ``d_next`` from the state where the reader passes them (``STEP_SCALARS``)."""
    scalars = state if "step_size" in state else step_sizes(xp, t, h, convention)
    dlr, d_next = scalars["step_size"], scalars["d_next"]
    root = xp.sqrt(state["exp_avg_sq"])
    eps = d_next * h["eps"]
    if convention == "optax" or h["beta1"] > 0:
        eta, direction = dlr / (root + eps), state["exp_avg"]
    else:
        eta, direction = dlr * d_next / (root + eps), state["grad"]
    return Elementwise(eta=eta, direction=direction, decay_rate=decay_rate(h, dlr),
                       eps_dominated=root < eps)
