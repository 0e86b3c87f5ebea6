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

(SGD's ``momentum`` is beta1.)  ``AdamWScheduleFreeReference`` and ``SGDScheduleFreeReference``
(``reference=True``) keep x, y and z in the state and copy y into the parameters (x in
eval mode)::

    AdamW: z <- z - lr * wd * y_before;   SGD: g <- g + wd * y_before (in place)
    z <- z - lr * g / D;   x <- lerp(x, z, c_t);   y <- lerp(z, x, beta1)

with the same eta and d; ``y_before = beta1 * x_before + (1 - beta1) * z_before`` is
rebuilt from x, z and g after the step (``x_before = (x - c_t * z) / (1 - c_t)``; at
``c_t = 1``, the first step, x, y and z were equal), and ``delta = y - y_before``.  Their
decay at z (``decay_at_z``) is not modelled.  The closure classes (``closure=True``:
``AdamWScheduleFreeClosure``, ``SGDScheduleFreeClosure``, ``RAdamScheduleFreeClosure``) keep
x in the parameters between steps; their step moves them to ``y = lerp(x, z, 1 - beta1)``,
evaluates the closure there, takes the same z-step (``g_hat`` written over the gradient)
and sets ``x <- lerp(x_before, z, c_t)``: eta and d as above, the decay ``lr * wd`` of
``y_before`` (not of the parameters), ``delta = x - x_before`` with ``x_before = (x - c_t *
z) / (1 - c_t)`` (``z_before`` at ``c_t = 1``).  ``AdamWScheduleFreePaper`` (``bias_correction=False``) takes
``D = sqrt(v) + eps`` and folds the correction into its lr: ``scheduled_lr`` is the warmed-up
lr times ``sqrt(1 - beta2**t)``, and its step size is that lr.  eta and d describe the z-sequence (``IDENTITY_STATE``),
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

Keras (``keras.optimizers.ScheduleFreeAdamW``), step t: ``momentum`` holds z (a copy of the
variable at build), the parameters hold y (in every mode: Keras never swaps x in, so a
train/eval switch does not exist), decoupled decay ``y_dec = y * (1 - lr * wd)`` first
(with the un-warmed lr), ``c_t = 1 / t`` (uniform averaging), ``lr_t = lr * min(t /
warmup_steps, 1)`` (``scheduled_lr``)::

    z    <- z - lr_t * g / (sqrt(v / (1 - beta2**t)) + eps)
    x_old = (y_dec - (1 - beta1) * z_old) / beta1
    y    <- (1 - beta1) * z + beta1 * lerp(x_old, z, c_t)

On the TensorFlow and torch backends ``z_old`` is read as ``momentum.value``, the live
variable, *after* the z update (``aliased_z=True``), and the rule collapses to
``y <- (1 - c_t) * y_dec + c_t * z``: y is the running average of the z iterates, beta1
plays no part.  On JAX (immutable arrays) it is the rule above.  Either way
``z - z_before = -eta * d`` with ``eta = lr_t / (sqrt(v / (1 - beta2**t)) + eps)``,
``d = g`` (Keras keeps no gradient: ``state["grad"]`` where given) and no decay on z
(``decay_rate`` reports ``lr * wd`` of y); ``delta``, the parameters' own change, is rebuilt
from z, y and g after the step.  Reported: ``lr`` = ``lr_t``, ``step_size``
(``lr_t * sqrt(1 - beta2**t)``), ``ckp1`` = ``1 / t``.

Optax (``optax.contrib.schedule_free_adamw`` / ``schedule_free_sgd``, a
``ScheduleFreeState`` around ``scale_by_rms(b2, eps, eps_in_sqrt=False,
bias_correction=True)``, ``add_decayed_weights(wd)``, ``scale_by_learning_rate``; SGD:
no D), step t: the z-step's lr is the schedule at ``t - 1`` (the base optimizer's count:
with ``warmup_steps``, 0 on the first step), while the averaging weight reads it at
``t`` (``ScheduleFreeState.step_count`` starts at 1)::

    max_lr <- max(max_lr, schedule(t));  weight = max_lr**weight_lr_power
    c_t    = weight / (weight_sum + weight)            # ckp1; 0 where 0/0
    z      <- z - lr * (g / D + wd * y)                # D as above (1 for SGD)
    x_prev = (y - (1 - beta1) * z_before) / beta1
    y      <- beta1 * ((1 - c_t) * x_prev + c_t * z) + (1 - beta1) * z

so ``z - z_before = -eta * d - decay_rate * y_before`` with ``eta = lr / D``, ``d = g``
(the raw gradient), ``decay_rate = lr * wd``.  The parameters hold y (x is
``optax.contrib.schedule_free_eval_params``); their change (``delta``) is predicted from
the modelled z-step, ``z_before`` (``state["z_before"]``) and ``y_before``
(``state["param_before"]``), which the model check compares with the real update.
Reported: ``lr`` (the z-step's), ``step_size`` as above, ``ckp1`` and ``max_lr``.
"""

from __future__ import annotations

from typing import Any, Mapping

from lrscope.formulas._common import Elementwise, bias_corrected, per_step

NAMES = ("schedule_free",)
STEP_SCALARS = ("lr", "ckp1")
#: The optax convention reads theta before the step (y_before, in the decay and in delta).
READS_PARAM_BEFORE = True
#: Hyperparameters that change every step, read from STEP_SCALARS in the state when there.
PER_STEP = ("ckp1",)
IDENTITY_STATE = "z"

DEFAULTS: dict[str, dict[str, Any]] = {
    # ``bias_correction=False``: AdamWScheduleFreePaper's D = sqrt(v) + eps (module docstring).
    "torch": {"lr": 0.0025, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
              "ckp1": 1.0, "adaptive": True, "train_mode": True, "bias_correction": True,
              "reference": False, "closure": False},
    # keras.optimizers.ScheduleFreeAdamW: ``scheduled_lr`` is lr_t as the step rounded it
    # (None: computed), ``aliased_z`` the TensorFlow/torch reading of z (module docstring).
    "keras": {"lr": 0.0025, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
              "warmup_steps": 0, "scheduled_lr": None, "aliased_z": False},
    # optax.contrib.schedule_free_adamw's arguments (sgd: adaptive=False, no b2/eps);
    # ckp1 and max_lr come from the ScheduleFreeState of each step.
    "optax": {"lr": 0.0025, "warmup_steps": None, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
              "weight_decay": 0.0, "weight_lr_power": 2.0, "state_dtype": None,
              "adaptive": True, "ckp1": 1.0, "max_lr": 0.0},
}


def step_sizes(xp: Any, t: Any, h: Mapping[str, Any], convention: str) -> dict[str, Any]:
    """``step_size`` (``lr * sqrt(1 - beta2**t)``, or ``lr`` without D) and ``ckp1`` (and
    optax's ``max_lr``, the lr the averaging weight used)."""
    if convention == "keras":
        return {"step_size": keras_lr(t, h) * (1 - h["beta2"] ** t) ** 0.5, "ckp1": 1 / t}
    lr = h["lr"]
    corrected = h["adaptive"] and h.get("bias_correction", True)
    out = {"step_size": lr * (1 - h["beta2"] ** t) ** 0.5 if corrected else lr, "ckp1": h["ckp1"]}
    if convention == "optax":
        out["max_lr"] = h["max_lr"]
    return out


def step_weight(t: Any, lr_max: Any, r: Any, weight_lr_power: Any) -> Any:
    """Step t's weight in schedulefree's average x (its torch classes and wrappers):
    ``t**r * lr_max**weight_lr_power``, ``lr_max`` the largest ``lr * d`` up to step t."""
    return (t ** r) * (lr_max ** weight_lr_power)


def averaging_weight(t: Any, lr_max: Any, weight_sum: Any, r: Any, weight_lr_power: Any) -> Any:
    """``c_t`` (``ckp1``) of step t as schedulefree's torch classes and wrappers compute it:
    ``step_weight / weight_sum``, with ``lr_max`` and ``weight_sum`` (the weights' sum up
    to step t included) as the step leaves them; 0 where ``weight_sum`` is 0.

    >>> averaging_weight(2, 0.5, 0.5, 0, 2.0)
    0.5
    """
    return step_weight(t, lr_max, r, weight_lr_power) / weight_sum if weight_sum else 0.0


def decay_rate(h: Mapping[str, Any], step_size: Any) -> Any:
    """``lr * wd`` (of the parameters y before the step)."""
    return h["lr"] * h["weight_decay"]


def elementwise(
    xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any], convention: str
) -> Elementwise:
    """eta and d of the z-sequence, and the parameters' change (``delta``)."""
    if convention == "keras":
        return _keras_elementwise(xp, state, t, h)
    if convention == "optax":
        return _optax_elementwise(xp, state, t, h)
    if h["reference"]:
        return _reference_elementwise(xp, state, t, h)
    if h["closure"]:
        return _closure_elementwise(xp, state, t, h)
    lr, ckp1 = per_step(state, h, "lr"), per_step(state, h, "ckp1")
    g_hat, z, y = state["grad"], state["z"], state["param"]
    if not h["train_mode"]:  # the parameters hold x
        y = y + (1 - h["beta1"]) * (z - y)
    z_before = z + lr * g_hat
    y_coef = lr * (h["beta1"] * (1 - ckp1) - 1)
    rebuilt = (y - ckp1 * z_before - y_coef * g_hat) / (1 - ckp1)
    y_before = _on_first_step(xp, ckp1, z_before, rebuilt)
    denom, eps_dominated = _denominator(xp, state, t, h)
    wd = h["weight_decay"]
    direction = (g_hat - wd * y_before) * denom if wd else g_hat * denom
    return Elementwise(eta=lr / denom, direction=direction, decay_rate=decay_rate(h, lr),
                       eps_dominated=eps_dominated, delta=y - y_before)


def _denominator(xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(D, eps_dominated)``: ``sqrt(v / (1 - beta2**t)) + eps`` where adaptive (the Paper
    class: ``sqrt(v) + eps``), else ``(1, None)``."""
    if not h["adaptive"]:
        return 1.0, None
    v = state["exp_avg_sq"]
    root = xp.sqrt(bias_corrected(v, 1 - h["beta2"] ** t) if h["bias_correction"] else v)
    return root + h["eps"], root < h["eps"]


def _on_first_step(xp: Any, ckp1: Any, first: Any, later: Any) -> Any:
    """``first`` where ``ckp1 == 1`` (the first step: the sequences started equal), else
    ``later``; a traced ``ckp1`` (a compiled caller's argument) without a branch on its value."""
    if isinstance(ckp1, (int, float)):
        return first if ckp1 == 1 else later
    return xp.where(ckp1 == 1, first, later)


def _reference_elementwise(xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any]) -> Elementwise:
    """The reference classes' z-step, with ``y_before`` rebuilt from x, z and g after it."""
    lr, ckp1, beta1, wd = per_step(state, h, "lr"), per_step(state, h, "ckp1"), h["beta1"], h["weight_decay"]
    x, z, grad = state["x"], state["z"], state["grad"]
    denom, eps_dominated = _denominator(xp, state, t, h)
    moved = z + lr * grad / denom  # z before the step, but for AdamW's decay (SGD's is in grad)
    shrink = 1.0 if not h["adaptive"] else 1 - lr * wd
    first = moved / shrink  # ckp1 = 1: x, y and z started equal
    x_before = (x - ckp1 * z) / (1 - ckp1 + (ckp1 == 1))
    later = (beta1 * x_before + (1 - beta1) * moved) / (1 - (1 - beta1) * (1 - shrink))
    y_before = _on_first_step(xp, ckp1, first, later)
    direction = grad if h["adaptive"] else grad - wd * y_before  # (SGD's grad holds the decay)
    return Elementwise(eta=lr / denom, direction=direction, decay_rate=lr * wd, eps_dominated=eps_dominated,
                       delta=state["y"] - y_before)


def _closure_elementwise(xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any]) -> Elementwise:
    """The closure classes' z-step; the parameters hold x (``delta`` is x's change), and
    the decay acts on ``y_before = lerp(x_before, z_before, 1 - beta1)``."""
    lr, ckp1, beta1, wd = per_step(state, h, "lr"), per_step(state, h, "ckp1"), h["beta1"], h["weight_decay"]
    g_hat, z, x = state["grad"], state["z"], state["param"]
    z_before = z + lr * g_hat
    x_before = _on_first_step(xp, ckp1, z_before, (x - ckp1 * z) / (1 - ckp1 + (ckp1 == 1)))
    y_before = x_before + (1 - beta1) * (z_before - x_before)
    denom, eps_dominated = _denominator(xp, state, t, h)
    return Elementwise(eta=lr / denom, direction=(g_hat - wd * y_before) * denom, decay_rate=lr * wd,
                       eps_dominated=eps_dominated, delta=x - x_before)


def keras_lr(t: Any, h: Mapping[str, Any], state: Mapping[str, Any] | None = None) -> Any:
    """Keras' warmed-up lr of step t: ``state["scheduled_lr"]`` or ``h["scheduled_lr"]``
    (as the step rounded it) where given, else ``lr * min(t / warmup_steps, 1)``.

    >>> keras_lr(2, {"lr": 0.01, "warmup_steps": 4, "scheduled_lr": None})
    0.005
    """
    given = per_step(state or {}, h, "scheduled_lr")
    if given is not None:
        return given
    warmup = h["warmup_steps"]
    return h["lr"] * min(t / warmup, 1.0) if warmup > 0 else h["lr"]


def _keras_elementwise(xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any]) -> Elementwise:
    """Keras' z-step and the y before it, rebuilt from z, y and g after the step."""
    lr, beta1 = keras_lr(t, h, state), h["beta1"]
    g, z, y = state["grad"], state["z"], state["param"]
    root = xp.sqrt(bias_corrected(state["exp_avg_sq"], 1 - h["beta2"] ** t))
    eta = lr / (root + h["eps"])
    z_before = z + eta * g
    ckp1 = 1 / t
    if isinstance(t, (int, float)) and t == 1:
        # Step 1 (c_t = 1) sets y = z: y before it was z before it (z starts as a copy of y).
        return Elementwise(eta=eta, direction=g, decay_rate=0.0, eps_dominated=root < h["eps"],
                           delta=y - z_before)
    if h["aliased_z"]:
        y_decayed = (y - ckp1 * z) / (1 - ckp1)
    else:
        y_decayed = (y - (1 - beta1) * z - beta1 * ckp1 * z) / (1 - ckp1) + (1 - beta1) * z_before
    y_before = y_decayed / (1 - h["lr"] * h["weight_decay"])
    if not isinstance(t, (int, float)):  # a traced step counter: no branch on its value
        y_before = xp.where(ckp1 == 1, z_before, y_before)
    return Elementwise(eta=eta, direction=g, decay_rate=0.0, eps_dominated=root < h["eps"],
                       delta=y - y_before)


def _optax_elementwise(xp: Any, state: Mapping[str, Any], t: Any, h: Mapping[str, Any]) -> Elementwise:
    """optax's z-step and the y it implies (see the module docstring)."""
    lr, ckp1, beta1, wd = h["lr"], h["ckp1"], h["beta1"], h["weight_decay"]
    g, z_before, y_before = state["grad"], state["z_before"], state.get("param_before")
    eps_dominated = None
    if h["adaptive"]:
        root = xp.sqrt(bias_corrected(state["exp_avg_sq"], 1 - h["beta2"] ** t))
        denom = root + h["eps"]
        eps_dominated = root < h["eps"]
        eta = lr / denom
    else:
        eta = lr
    delta = None
    if y_before is not None:
        z = z_before - eta * g - lr * wd * y_before
        x_before = (y_before - (1.0 - beta1) * z_before) / beta1
        y = beta1 * ((1.0 - ckp1) * x_before + ckp1 * z) + (1.0 - beta1) * z
        delta = y - y_before
    return Elementwise(eta=eta, direction=g, decay_rate=lr * wd, eps_dominated=eps_dominated,
                       delta=delta)
