r"""Lion (Chen et al., 2023): a sign method.

    d = sign(beta1 * m_before + (1 - beta1) * g),   eta = lr
    m <- beta2 * m_before + (1 - beta2) * g

``m_before`` is recovered from the state after the step as
``(m - (1 - beta2) * g) / beta2`` (requires beta2 > 0) unless the backend passes it as
``exp_avg_before`` (optax's wrapper sees the state before the step, and rounding in the
recovery could flip the sign of a near-zero element).  Weight decay is decoupled
(``decay_rate = lr * wd``) in keras and optax.  ``step_size = lr``.

torch (the PyTorch implementations: ``timm.optim.Lion``, ``lion_pytorch.Lion``,
``pytorch_optimizer.Lion``, bitsandbytes' ``Lion8bit``/``Lion32bit``): the same rule with
``theta *= 1 - decay_lr * wd`` first, where ``decay_lr`` is the lr the implementation
scales the decay by: None means ``lr``; timm's ``corrected_weight_decay`` uses
``lr**2 / max_lr``, lion-pytorch's ``decoupled_weight_decay`` ``lr / initial lr``,
pytorch_optimizer's ``fixed_decay`` 1 (their models pass it).  ``maximize`` (timm) steps
along ``-g``.  Coupled decay (pytorch_optimizer's ``weight_decouple=False``) is added to
the gradient in place, so the gradient after the step already holds it (``weight_decay``
is then 0 for the formula).

>>> step_sizes(None, 1, {"lr": 1e-4}, "optax")
{'step_size': 0.0001}
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas._common import Elementwise, scaled_decay_rate as decay_rate

NAMES = ("lion",)

DEFAULTS: dict[str, dict[str, Any]] = {
    "keras": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.0},
    "optax": {"lr": None, "beta1": 0.9, "beta2": 0.99, "weight_decay": 1e-3},
    "torch": {"lr": 1e-4, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.0, "maximize": False,
              "decay_lr": None},
}


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``{"step_size": lr}``."""
    return {"step_size": h["lr"]}


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta = lr everywhere; d = the sign vector the step used."""
    grad = -state["grad"] if h.get("maximize") else state["grad"]
    before = state.get("exp_avg_before")
    if before is None:
        before = (state["exp_avg"] - (1 - h["beta2"]) * grad) / h["beta2"]
    direction = xp.sign(h["beta1"] * before + (1 - h["beta1"]) * grad)
    return Elementwise(eta=h["lr"] + 0 * grad, direction=direction,
                       decay_rate=decay_rate(h))
