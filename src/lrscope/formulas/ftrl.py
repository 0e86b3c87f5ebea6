r"""FTRL-Proximal (McMahan et al., 2013): per-coordinate learning rates from the accumulated
squared gradients, with L1/L2 regularization applied in closed form.

Keras (``keras.optimizers.Ftrl``), step t, ``n`` the accumulator (``initial_accumulator_value``
at the start), ``z`` the linear term (0 at the start), ``p = learning_rate_power`` (<= 0),
``w`` the weights after the decoupled decay (``w_dec = w * (1 - lr * weight_decay)``)::

    g_s   = g + 2 * l2_shrinkage * w_dec
    n'    = n + g**2
    z    <- z + g_s - (n'**(-p) - n**(-p)) / lr * w_dec
    q     = n'**(-p) / lr + 2 * (l2 + beta / (2 * lr))
    w    <- (clip(z, -l1, l1) - z) / q

so the per-element step is ``eta = 1 / q = lr / (n'**(-p) + beta + 2 * lr * l2)``, read from
the accumulator after the step (exact, no gradient needed).  Where FTRL reduces to online
gradient descent (``l1 = 0``, the lr of the step equal to the previous step's, from step 2
on) the step is ``w <- w_dec - eta * g_s``, so ``d = g_s``.  Elsewhere the closed form is a
proximal step: the L1 threshold sets or releases weights, a changed lr re-weights the whole
history, and step 1 (``z`` starts at 0, not at ``-q0 * w0``) also pulls the weights towards
0 by ``q0 / q`` of them.  ``d`` is therefore taken as the step the weights really made::

    d = (w_dec - w) / eta,     decay_rate = lr * weight_decay

*measured* from a copy of the weights taken before the step (``state["param_before"]``);
``d`` equals ``g_s`` in the online-gradient-descent regime (the tests check this, which
checks eta).  Without the copy, eta is still exact and ``d`` is left zero (the caller then
reports no update norms).  ``step_size`` is ``lr``; no eps (``eps_dominated`` None).

>>> import numpy as np
>>> h = {**DEFAULTS["keras"], "lr": 0.1}
>>> float(elementwise(np, {"accumulator": np.array(4.0), "param": np.array(1.0)}, 1, h, "keras").eta)
0.05
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas._common import Elementwise

NAMES = ("ftrl",)
#: eta does not depend on t.
USES_STEP = False

DEFAULTS: dict[str, dict[str, Any]] = {
    "keras": {"lr": 1e-3, "lr_power": -0.5, "initial_accumulator_value": 0.1, "l1": 0.0, "l2": 0.0,
              "l2_shrinkage": 0.0, "beta": 0.0, "weight_decay": 0.0},
}


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``{"step_size": lr}``: the rest of eta depends on the accumulator."""
    return {"step_size": h["lr"]}


def decay_rate(h: Mapping[str, Any], step_size: Any = None) -> Any:
    """``lr * weight_decay`` (Keras' decoupled decay, before the FTRL step)."""
    return h["lr"] * h["weight_decay"]


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta = 1 / q from ``state["accumulator"]``; d from ``state["param_before"]`` when given."""
    lr = h["lr"]
    quadratic = state["accumulator"] ** (-h["lr_power"]) / lr + 2 * (h["l2"] + h["beta"] / (2 * lr))
    eta = 1 / quadratic
    decay = decay_rate(h)
    param = state["param"]
    before = state.get("param_before")
    if before is None:
        direction = param * 0
    else:
        direction = ((before - decay * before) - param) * quadratic
    return Elementwise(eta=eta, direction=direction, decay_rate=decay)
