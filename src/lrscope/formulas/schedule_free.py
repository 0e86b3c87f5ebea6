r"""Schedule-free AdamW, SGD and RAdam (Defazio et al., 2024): SGD/Adam steps on a sequence
z, the parameters an interpolation between z and its average x.

``schedulefree.AdamWScheduleFree`` / ``SGDScheduleFree`` / ``RAdamScheduleFree``, step t
(``group["k"]`` after the step).  In train mode the parameters hold ``y``; ``lr`` is the
lr the step applied, ``group["scheduled_lr"]`` (the group's lr times the linear warmup
``t / warmup_steps``, or RAdam's rectification, 0 or 1 in its SGD phase), and ``c_{t}``
(``ckp1``) the averaging weight ``t**r * lr_max**weight_lr_power / weight_sum``::

    D     = sqrt(v / (1 - beta2**t)) + eps    (AdamW; RAdam once rho_t > 4; else D = 1)
    g_hat = g / D + wd * y                    # written over the gradient, in place
    y    <- lerp(y, z, c_t) + lr * (beta1 * (1 - c_t) - 1) * g_hat
    z    <- z - lr * g_hat

(SGD's ``momentum`` is beta1.)  eta and d describe the z-sequence (``IDENTITY_STATE``),
decay counted on the parameters y before the step::

    z - z_before = -eta * d - decay_rate * y_before,
    eta = lr / D,   d = g (the raw gradient),   decay_rate = lr * wd

The state after the step holds ``g_hat`` (``grad``), z and y; ``y_before`` is rebuilt from
them, ``(y - c_t * z_before - lr * (beta1 * (1 - c_t) - 1) * g_hat) / (1 - c_t)`` with
``z_before = z + lr * g_hat`` (``y_before = z_before`` where ``c_t = 1``: the first step),
so ``d = (g_hat - wd * y_before) * D`` and the parameters' own change ``y - y_before``
(``Elementwise.delta``: the update norms describe the parameters) need no copy.

Reported: ``lr`` (``scheduled_lr``), ``step_size`` (``lr * sqrt(1 - beta2**t)`` where D is
adaptive: the data-independent part of eta, as Adam's; else ``lr``), ``ckp1``.  In eval
mode (``train_mode=False``) the parameters hold ``x = lerp(y, z, 1 - 1/beta1)``: the
formula turns them back into ``y = lerp(x, z, 1 - beta1)`` as ``train()`` does (to
rounding), so a ``train()``/``eval()`` switch is not an update.
``eps_dominated`` where ``sqrt(v / (1 - beta2**t)) < eps``.
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas._common import Elementwise, per_step

NAMES = ("schedule_free",)
STEP_SCALARS = ("lr", "ckp1")
#: Hyperparameters that change every step, read from STEP_SCALARS in the state when there.
PER_STEP = ("ckp1",)
IDENTITY_STATE = "z"

DEFAULTS: dict[str, dict[str, Any]] = {
    "torch": {"lr": 0.0025, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
              "ckp1": 1.0, "adaptive": True, "train_mode": True},
}


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``step_size`` (``lr * sqrt(1 - beta2**t)``, or ``lr`` without D) and ``ckp1``."""
    lr = h["lr"]
    return {"step_size": lr * (1 - h["beta2"] ** t) ** 0.5 if h["adaptive"] else lr, "ckp1": h["ckp1"]}


def decay_rate(h: Mapping[str, Any], step_size: Any) -> Any:
    """``lr * wd`` (of the parameters y before the step)."""
    return h["lr"] * h["weight_decay"]


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta and d of the z-sequence, and the parameters' change (``delta``)."""
    lr, ckp1 = per_step(state, h, "lr"), per_step(state, h, "ckp1")
    g_hat, z, y = state["grad"], state["z"], state["param"]
    if not h["train_mode"]:  # the parameters hold x
        y = y + (1 - h["beta1"]) * (z - y)
    z_before = z + lr * g_hat
    y_coef = lr * (h["beta1"] * (1 - ckp1) - 1)
    rebuilt = (y - ckp1 * z_before - y_coef * g_hat) / (1 - ckp1)
    if isinstance(ckp1, (int, float)):
        y_before = z_before if ckp1 == 1 else rebuilt
    else:  # a traced scalar: no branch on its value
        y_before = xp.where(ckp1 == 1, z_before, rebuilt)
    eps_dominated = None
    if h["adaptive"]:
        root = xp.sqrt(state["exp_avg_sq"] / (1 - h["beta2"] ** t))
        denom = root + h["eps"]
        eps_dominated = root < h["eps"]
    else:
        denom = 1.0
    wd = h["weight_decay"]
    direction = (g_hat - wd * y_before) * denom if wd else g_hat * denom
    return Elementwise(eta=lr / denom, direction=direction, decay_rate=decay_rate(h, lr),
                       eps_dominated=eps_dominated, delta=y - y_before)
