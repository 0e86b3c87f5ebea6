"""The Keras optimizers lrscope models: each class's family, where its hyperparameters and
state live, and what the newer ones need beyond a table.

A table rather than ``lrscope.register``: the registry's hooks read PyTorch parameter
groups (dicts of hyperparameters, ``GroupStep``); a Keras optimizer keeps its
hyperparameters as attributes and its state as lists of variables, Muon splits one
optimizer into two update rules by variable, and MultiOptimizer nests optimizers.  So the
Keras reader keeps these tables (checked against keras 3.15's ``keras/src/optimizers/``):

* Muon (``formulas.muon``, Keras convention): the variables with an ``adam_velocities`` slot
  take its Adam rule, the others its Muon rule, reported as the groups "adam" and "muon".
  ``d`` of a matrix, the orthogonalized update, is not in the state: it is computed with the
  optimizer's own ``zeropower_via_newtonschulz5`` on the step's input (``m`` without
  Nesterov; ``g + momentum * m`` with it, given the gradient), bit for bit the step's; with
  Nesterov and no gradient it is measured from a copy of the matrix taken before the step.
* ScheduleFreeAdamW (``formulas.schedule_free``): the warmed-up lr as the backend rounds it,
  and which z the backend's step reads (``aliased_z``).
* Ftrl (``formulas.ftrl``): eta from the accumulator; d from a copy taken before the step.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
from keras import ops

from lrscope.formulas import muon as muon_formula

_OPT = keras.optimizers
BACKEND = keras.backend.backend()

#: Keras optimizer classes lrscope models exactly, with their family.
FAMILY_OF: dict[type, str] = {
    _OPT.Adam: "adam", _OPT.AdamW: "adamw", _OPT.SGD: "sgd", _OPT.RMSprop: "rmsprop",
    _OPT.Adagrad: "adagrad", _OPT.Adamax: "adamax", _OPT.Nadam: "nadam",
    _OPT.Adadelta: "adadelta", _OPT.Lion: "lion", _OPT.Lamb: "lamb", _OPT.Adafactor: "adafactor",
    _OPT.Ftrl: "ftrl", _OPT.Muon: "muon", _OPT.ScheduleFreeAdamW: "schedule_free",
}
_BETAS = {"beta1": "beta_1", "beta2": "beta_2"}
#: lrscope hyperparameter name -> optimizer attribute, per family.
HYPER: dict[str, dict[str, str]] = {
    "adam": {**_BETAS, "eps": "epsilon", "amsgrad": "amsgrad"},
    "adamw": {**_BETAS, "eps": "epsilon", "amsgrad": "amsgrad"},
    "sgd": {"momentum": "momentum", "nesterov": "nesterov"},
    "rmsprop": {"rho": "rho", "momentum": "momentum", "eps": "epsilon", "centered": "centered"},
    "adagrad": {"eps": "epsilon", "initial_accumulator_value": "initial_accumulator_value"},
    "adamax": {**_BETAS, "eps": "epsilon"},
    "nadam": {**_BETAS, "eps": "epsilon"},
    "adadelta": {"rho": "rho", "eps": "epsilon"},
    "lion": dict(_BETAS),
    "lamb": {**_BETAS, "eps": "epsilon"},
    "adafactor": {"beta2_decay": "beta_2_decay", "eps": "epsilon_1", "eps2": "epsilon_2",
                  "clip_threshold": "clip_threshold", "relative_step": "relative_step"},
    "ftrl": {"lr_power": "learning_rate_power", "initial_accumulator_value": "initial_accumulator_value",
             "l1": "l1_regularization_strength", "l2": "l2_regularization_strength",
             "l2_shrinkage": "l2_shrinkage_regularization_strength", "beta": "beta"},
    "muon": {"momentum": "momentum", "nesterov": "nesterov", "ns_steps": "ns_steps", "rms_rate": "rms_rate",
             "adam_beta1": "adam_beta_1", "adam_beta2": "adam_beta_2", "eps": "epsilon",
             "adam_lr_ratio": "adam_lr_ratio"},
    "schedule_free": {**_BETAS, "eps": "epsilon", "warmup_steps": "warmup_steps"},
}
#: Config keys that are no hyperparameter of the formula yet are modelled: Muon's routing
#: (read from the state: which variables have a velocity slot), its Newton-Schulz
#: coefficients (the optimizer's own function is called) and its Adam decay (read apart).
MODELLED_CONFIG: dict[str, tuple[str, ...]] = {
    "muon": ("exclude_layers", "exclude_embeddings", "muon_a", "muon_b", "muon_c", "adam_weight_decay"),
}
#: lrscope (PyTorch) state name -> optimizer attribute holding one variable per weight.
STATE: dict[str, dict[str, str]] = {
    "adam": {"exp_avg": "_momentums", "exp_avg_sq": "_velocities",
             "max_exp_avg_sq": "_velocity_hats"},
    "sgd": {"momentum_buffer": "momentums"},
    "rmsprop": {"square_avg": "_velocities", "momentum_buffer": "_momentums",
                "grad_avg": "_average_gradients"},
    "adagrad": {"sum": "_accumulators"},
    "adamax": {"exp_avg": "_m", "exp_inf": "_u"},
    "nadam": {"exp_avg": "_momentums", "exp_avg_sq": "_velocities"},
    "adadelta": {"square_avg": "_accumulated_grads"},
    "lion": {"exp_avg": "_momentums"},
    "lamb": {"exp_avg": "_momentums", "exp_avg_sq": "_velocities"},
    "adafactor": {"exp_avg_sq": "_v"},
    "ftrl": {"accumulator": "_accumulators"},
    "muon": {"exp_avg": "momentums", "exp_avg_sq": "adam_velocities"},
    "schedule_free": {"z": "_momentums", "exp_avg_sq": "_velocities"},
}
STATE["adamw"] = STATE["adam"]
#: Hyperparameters Keras passes through ``ops.cast`` before they enter the step's
#: arithmetic; TensorFlow's cast of a Python float goes through float32 on the way.
CAST = {"adam": ("beta1", "beta2"), "adamw": ("beta1", "beta2"), "adamax": ("beta1",),
        "nadam": ("beta1", "beta2"), "lion": ("beta1", "beta2"), "lamb": ("beta1", "beta2"),
        "sgd": ("momentum",), "adafactor": ("eps2",), "muon": ("adam_beta1", "adam_beta2"),
        "schedule_free": ("beta1", "beta2", "eps")}
#: Python floats the step passes to a ``keras.ops`` function (not an operator): on torch it
#: converts them to float32 tensors first (Muon's ``ops.add(ops.sqrt(v), self.epsilon)``,
#: Ftrl's ``ops.power(new_accum, -lr_power)``).
TORCH_FLOAT32 = {"muon": ("eps",), "ftrl": ("lr_power",)}
#: Methods of the step, besides ``update_step``, that a subclass must not override for the
#: model to hold (Muon's ``zeropower_via_newtonschulz5`` may be: lrscope calls it).
STEP_METHODS: dict[str, tuple[str, ...]] = {
    "muon": ("_muon_update_step", "_adamw_update_step", "lr_adjust", "_apply_weight_decay"),
}
#: Families whose class applies the weight decay itself (not the backend's optimizer).
OWN_WEIGHT_DECAY = {"muon"}


def f32(value: Any) -> float:
    """``value`` rounded to float32, as a Python float."""
    return float(np.float32(value))


# --- Muon ---------------------------------------------------------------------------------


def on_muon_path(optimizer: Any, index: int | None, variable: Any) -> bool:
    """Whether Muon's step takes its Muon rule for ``variable``: no ``adam_velocities`` slot
    (the test its ``update_step`` makes), or, before the optimizer is built, what its
    ``build`` will decide (``_should_use_adamw``)."""
    if index is None:
        return not optimizer._should_use_adamw(variable)
    return optimizer.adam_velocities[index] is None and optimizer.momentums[index] is not None


def muon_weight_decay(value: Any) -> float:
    """Muon's own ``_apply_weight_decay`` casts the Python decay with ``ops.cast``, which on
    TensorFlow goes through float32 (elsewhere exact)."""
    if value is None:
        return 0.0
    return f32(value) if BACKEND == "tensorflow" else float(value)


def muon_adam_lr(lr: float, ratio: Any) -> float:
    """``learning_rate * adam_lr_ratio`` as Muon computes it: the float32 lr times the
    Python ratio, in float32 on every backend."""
    return float(np.float32(lr) * np.float32(ratio))


def orthogonalized(optimizer: Any, index: int, grad: Any, before: Any, h: dict[str, Any],
                   param: Any) -> tuple[Any, str | None]:
    """``(O, how)``: the orthogonalized update of the matrix ``index`` at the step just
    taken, ``how`` "computed" (the optimizer's own Newton-Schulz function on the step's
    input, rebuilt from the state and ``grad``: the same operations on the same values)
    or "measured" (from ``before``, the matrix before the step: ``O = (before * (1 -
    decay) - param) / eta``), or ``(zeros, None)`` when neither is possible (Nesterov, no
    gradient, no copy)."""
    momentum = optimizer.momentums[index]
    if grad is not None or not optimizer.nesterov:
        # Muon's own expressions: ``g = ops.add(gradient, self.momentum * m)`` or ``g = m``.
        update = ops.add(grad, optimizer.momentum * momentum) if optimizer.nesterov else momentum
        return optimizer.zeropower_via_newtonschulz5(update, optimizer.ns_steps), "computed"
    if before is None:
        return ops.zeros_like(param), None
    eta = muon_formula.keras_adjusted_lr(h["lr"], tuple(param.shape), h["rms_rate"])
    if eta == 0 or not math.isfinite(eta):
        return ops.zeros_like(param), "measured"
    decay = h["lr"] * h["weight_decay"]
    return (before - before * decay - param) / eta, "measured"


# --- ScheduleFreeAdamW --------------------------------------------------------------------

#: Backends on which ScheduleFreeAdamW's ``momentum.value`` is the live variable, read after
#: the z update (its "momentum_old"): JAX arrays are immutable, so there it is the old z.
ALIASED_Z_BACKENDS = ("tensorflow", "torch")


def schedule_free_lr(lr: float, t: int, warmup_steps: int, dtype: str) -> float:
    """The warmed-up lr of step t as Keras computes it: ``lr * min(t / warmup, 1)`` in the
    variables' dtype, except that on torch ``ops.minimum`` with the Python 1.0 rounds the
    factor to float32; float32 variables: everything in float32."""
    if warmup_steps <= 0:
        return lr
    if dtype != "float64":
        return f32(np.float32(lr) * np.minimum(np.float32(t) / np.float32(warmup_steps), np.float32(1)))
    factor = min(t / warmup_steps, 1.0)
    return lr * (f32(factor) if BACKEND == "torch" else factor)
