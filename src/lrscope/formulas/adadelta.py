r"""Adadelta: a learning rate from the ratio of two running RMS values.

With ``E`` the running mean of ``g'**2`` (after this step) and ``A`` the running
mean of squared updates *before* this step (the state after the step has already
folded in the new update, so the backends record ``acc_delta_before`` ahead of it)::

    eta = lr * sqrt(A_before + eps) / sqrt(E + eps),    d = g'

torch: lr 1.0, rho 0.9, eps 1e-6, coupled L2 decay; keras: lr 1e-3, rho 0.95, eps 1e-7,
decoupled decay; optax: coupled decay (``add_decayed_weights`` before the scaling; d uses
``param_before``, theta before the step, which the optax backend has), and
the default ``learning_rate=None`` applies neither a learning rate nor the sign flip, so
the step *ascends* (an upstream bug that lrscope reports as ``lr = -1``, a negative eta,
rather than hiding).  ``step_size = lr``;
``eps_dominated`` where ``E < eps``.

>>> step_sizes(None, 1, {"lr": 1.0}, "torch")
{'step_size': 1.0}
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas._common import Elementwise, coupled_direction

NAMES = ("adadelta",)
#: The optax convention reads theta before the step in eta or d, so it cannot be
#: recovered from theta after the step through the model (see lrscope/optax/transform.py).
READS_PARAM_BEFORE = True

DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0, "maximize": False},
    "keras": {"lr": 1e-3, "rho": 0.95, "eps": 1e-7, "weight_decay": 0.0},
    "optax": {"lr": None, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0},
}


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``{"step_size": lr}``."""
    return {"step_size": h["lr"]}


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta from ``square_avg`` and ``acc_delta_before``; d = the gradient."""
    square_avg, eps = state["square_avg"], h["eps"]
    eta = h["lr"] * xp.sqrt(state["acc_delta_before"] + eps) / xp.sqrt(square_avg + eps)
    if convention == "optax":  # wd * theta is added to g before the scaling; optax's
        # wrapper passes theta before the step, so d needs no reconstruction.
        direction = state["grad"]
        if h["weight_decay"]:
            direction = direction + h["weight_decay"] * state["param_before"]
        return Elementwise(eta=eta, direction=direction, eps_dominated=square_avg < eps)
    if convention == "torch":
        direction = coupled_direction(xp, state.get("param"), state["grad"], eta, 1.0, 0.0,
                                      h["weight_decay"], h["maximize"])
        return Elementwise(eta=eta, direction=direction, eps_dominated=square_avg < eps)
    return Elementwise(eta=eta, direction=state["grad"], decay_rate=h["lr"] * h["weight_decay"],
                       eps_dominated=square_avg < eps)
