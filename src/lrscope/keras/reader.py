"""Keras 3 backend: read a Keras optimizer's variables, compute with ``keras.ops``.

Written with ``keras.ops``, so it runs on the tensorflow, jax and torch backends; the
statistics take each backend's fast path where it has one (``_statistics``): one jitted
computation on JAX (``keras_jax``), lrscope's PyTorch passes on torch (``keras_torch``),
one ``tf.function`` graph per chunk on TensorFlow (``keras_tensorflow``).
Conventions (SPEC §2): after step t ``optimizer.iterations == t`` and the schedule was
evaluated at the raw iteration ``t - 1`` (with ``gradient_accumulation_steps = k``,
Keras counts micro-batches: the step moved the variables at raw iteration ``t*k - 1``);
eps placement per family is in ``lrscope.formulas``.  Keras keeps no gradients after
the step: families whose direction needs g (SGD without momentum or with Nesterov,
RMSprop without momentum, Adagrad, Adadelta, Nadam, Lion) report exact eta and leave
the update norms out unless ``grads=`` is passed.  Supported: Adam, AdamW, SGD, RMSprop,
Adagrad, Adamax, Nadam, Adadelta, Lion, Lamb, Adafactor (eta needs ``grads=``); any
other class, or an option lrscope does not model: lr only, with a note, and in empirical
mode the realized update, |delta theta| from a copy of the variables taken before the step.
"""

from __future__ import annotations

import importlib
import math
from functools import partial
from typing import Any, Sequence

import keras
import numpy as np
from keras import ops

from lrscope import formulas
from lrscope.keras import stats as keras_stats
from lrscope.formulas import Elementwise
from lrscope.report import GroupReport, ParamReport, StepReport

_OPT = keras.optimizers
#: Keras optimizer classes lrscope models exactly, with their family.
FAMILY_OF: dict[type, str] = {
    _OPT.Adam: "adam", _OPT.AdamW: "adamw", _OPT.SGD: "sgd", _OPT.RMSprop: "rmsprop",
    _OPT.Adagrad: "adagrad", _OPT.Adamax: "adamax", _OPT.Nadam: "nadam",
    _OPT.Adadelta: "adadelta", _OPT.Lion: "lion", _OPT.Lamb: "lamb", _OPT.Adafactor: "adafactor",
}
_BETAS = {"beta1": "beta_1", "beta2": "beta_2"}
#: lrscope hyperparameter name -> optimizer attribute, per family.
_HYPER: dict[str, dict[str, str]] = {
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
}
#: lrscope (PyTorch) state name -> optimizer attribute holding one variable per weight.
_STATE: dict[str, dict[str, str]] = {
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
}
_STATE["adamw"] = _STATE["adam"]
#: Hyperparameters Keras passes through ``ops.cast`` before they enter the step's
#: arithmetic; TensorFlow's cast of a Python float goes through float32 on the way.
_CAST = {"adam": ("beta1", "beta2"), "adamw": ("beta1", "beta2"), "adamax": ("beta1",),
         "nadam": ("beta1", "beta2"), "lion": ("beta1", "beta2"), "lamb": ("beta1", "beta2"),
         "sgd": ("momentum",), "adafactor": ("eps2",)}
#: Families whose eta itself depends on the gradient (Adafactor's update clipping).
_ETA_NEEDS_GRAD = {"adafactor"}
#: Base-optimizer config keys that leave the update rule as modelled.
_NEUTRAL_CONFIG = {"name", "learning_rate", "weight_decay", "clipnorm", "global_clipnorm",
                   "clipvalue", "use_ema", "ema_momentum", "ema_overwrite_frequency",
                   "loss_scale_factor", "gradient_accumulation_steps"}
BACKEND = keras.backend.backend()


def unwrap(optimizer: Any) -> Any:
    """The optimizer that really steps: ``LossScaleOptimizer.inner_optimizer`` or itself."""
    while isinstance(optimizer, _OPT.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer


def accepts(obj: Any) -> bool:
    return isinstance(unwrap(obj), _OPT.Optimizer)


def hint(obj: Any) -> str | None:
    """What to do with a Keras object lrscope cannot read, or None for anything else."""
    if isinstance(obj, keras.Model):
        return ("this is the model: pass model.optimizer, or give "
                "lrscope.keras.EffectiveLRCallback() to model.fit(callbacks=[...])")
    return None


def family_of(optimizer: Any) -> str | None:
    """The family modelled exactly, or None (another class, or one overriding update_step)."""
    cls = type(optimizer)
    for base in cls.__mro__:
        if base in FAMILY_OF:
            return FAMILY_OF[base] if cls.update_step is base.update_step else None
    return None


def _needs_grad(family: str, h: dict[str, Any]) -> bool:
    """Whether the direction d needs the gradient, which Keras does not keep."""
    if family == "sgd":
        return h["momentum"] == 0 or h["nesterov"]
    if family == "rmsprop":
        return h["momentum"] == 0
    return family not in ("adam", "adamw", "adamax", "lamb")


def _measured_note(empirical: bool) -> str:
    """What the note on a step lrscope does not model says about empirical mode."""
    if empirical:
        return ("; its realized update is measured instead (empirical=True: one copy of the "
                "trainable variables on each measured step; empirical=False turns it off)")
    return ("; pass empirical=True to measure the realized update (costs one copy of the "
            "trainable variables per measured step)")


def _float(value: Any) -> float:
    return float(ops.convert_to_numpy(value))


def _float_dtype() -> str:
    """float64 where the backend has it (jax without x64 has not)."""
    return keras.backend.standardize_dtype(ops.convert_to_tensor(np.zeros(1)).dtype)


class KerasReader:
    """Turns a Keras optimizer's variables into StepReports."""

    def __init__(self, optimizer: Any, empirical: bool = False):
        self.optimizer = unwrap(optimizer)
        if not isinstance(self.optimizer, _OPT.Optimizer):
            raise TypeError(f"expected a Keras 3 optimizer, got {type(optimizer).__name__}")
        self.family = family_of(self.optimizer)
        self.notes: list[str] = []
        if self.family is None:
            self.notes.append(
                f"{type(self.optimizer).__name__} is not a Keras optimizer lrscope "
                "models exactly (or it overrides update_step): only lr is reported"
                + _measured_note(empirical)
            )
        self.unsupported = self._unsupported()
        if self.unsupported:
            self.notes.append(
                f"option(s) {', '.join(self.unsupported)} not modelled by lrscope; "
                "distributions skipped rather than mis-modelled" + _measured_note(empirical)
            )
        #: Empirical mode where lrscope does not model the step: the realized update.
        self.measured = empirical and (self.family is None or bool(self.unsupported))

    def _unsupported(self) -> list[str]:
        if self.family is None:
            return []
        opt = self.optimizer
        out = [
            f"{k}={v!r}"
            for k, v in opt.get_config().items()
            if k not in _NEUTRAL_CONFIG
            and k not in _HYPER[self.family].values()
            and v not in (None, False, 0)
        ]
        if opt.use_ema and opt.ema_overwrite_frequency:
            out.append(f"ema_overwrite_frequency={opt.ema_overwrite_frequency}")
        return out

    def position(self) -> tuple[int, int, bool]:
        """(raw iterations, t, whether the last call moved the variables)."""
        raw = int(ops.convert_to_numpy(self.optimizer._iterations))
        k = self.optimizer.gradient_accumulation_steps
        if k:
            return raw, raw // k, raw > 0 and raw % k == 0
        return raw, raw, raw > 0

    def learning_rate(self, t: int) -> float:
        """The lr step t used: a schedule evaluated at that step's raw iteration."""
        schedule = self.optimizer._learning_rate
        if isinstance(schedule, _OPT.schedules.LearningRateSchedule):
            k = self.optimizer.gradient_accumulation_steps or 1
            return _float(schedule(t * k - 1))
        return _float(self.optimizer.learning_rate)

    def weight_decay(self, lr: float) -> float:
        """The weight decay as the formulas take it (they remove ``lr * weight_decay`` of
        theta), with its backend's roundings.

        TensorFlow casts the Python ``weight_decay`` through float32; torch computes
        ``1 - wd * lr`` in float32 (lr is a float32 tensor).  Those roundings change the
        decay by up to 1e-3 relative, so they are modelled.  (Elsewhere the value does not
        depend on lr: ``keras_jax`` compiles again when it changes.)
        """
        wd = float(self.optimizer.weight_decay or 0.0)
        if wd == 0 or lr == 0:
            return 0.0
        f32 = np.float32
        if BACKEND == "torch":
            return (1.0 - float(f32(1.0) - f32(f32(wd) * f32(lr)))) / lr
        if BACKEND == "tensorflow":
            return float(f32(wd))
        return wd

    def hyperparameters(self, lr: float) -> dict[str, Any]:
        opt = self.optimizer
        given = {name: getattr(opt, attribute) for name, attribute in _HYPER[self.family].items()}
        for name in _CAST.get(self.family, ()) if BACKEND == "tensorflow" else ():
            given[name] = float(np.float32(given[name]))
        given["weight_decay"] = self.weight_decay(lr)
        return formulas.hyperparameters(self.family, "keras", lr=lr, **given)

    def variables(self) -> list[Any]:
        return list(getattr(self.optimizer, "_trainable_variables", []))

    def state_of(self, index: int) -> dict[str, Any]:
        state = {}
        for name, attribute in _STATE[self.family].items():
            slots = getattr(self.optimizer, attribute, None)
            if slots and slots[index] is not None:
                state[name] = ops.convert_to_tensor(slots[index])
        if self.family == "nadam":
            state["mu_product"] = _float(self.optimizer._u_product)
        return state

    def record_before(self, variables: Sequence[Any] | None = None) -> dict[int, dict[str, Any]]:
        """What the coming step overwrites and the report needs, by variable index: Adadelta's
        deltas; in empirical mode a copy of each variable (``param_before``).  ``variables``:
        those the coming ``apply`` updates, in its order (an optimizer not yet built is built
        with them); default the optimizer's."""
        if self.measured:
            if variables is None:
                indexed = enumerate(self.variables())
            elif self.optimizer.built:
                indexed = ((self.optimizer._get_variable_index(v), v) for v in variables)
            else:
                indexed = enumerate(variables)
            return {i: {"param_before": ops.copy(ops.convert_to_tensor(v))} for i, v in indexed}
        if self.family != "adadelta" or not self.optimizer.built:
            return {}
        return {
            i: {"acc_delta_before": ops.copy(ops.convert_to_tensor(a))}
            for i, a in enumerate(self.optimizer._accumulated_delta_vars)
        }

    def formula_inputs(
        self, index: int, t: int, h: dict[str, Any], grad: Any, recorded: dict[str, Any] | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The formula's state of variable ``index`` (PyTorch names, ``param`` after the
        step, ``grad`` None when not given) and its hyperparameters."""
        var = self.variables()[index]
        param = ops.convert_to_tensor(var)
        state = {**self.state_of(index), **(recorded or {}), "param": param, "grad": grad}
        if self.family == "adadelta" and "acc_delta_before" not in state and t == 1:
            state["acc_delta_before"] = ops.zeros_like(param)  # Keras starts it at zero
        if not self.optimizer._use_weight_decay(var):
            h = {**h, "weight_decay": 0.0}
        return state, h

    def elementwise(
        self,
        index: int,
        t: int,
        h: dict[str, Any],
        grad: Any,
        recorded: dict[str, Any] | None,
        chunk: slice | None = None,
    ) -> Elementwise:
        """eta and d of variable ``index`` (of the flat slice ``chunk`` of it, if given)."""
        state, h = self.formula_inputs(index, t, h, grad, recorded)
        if grad is None:
            # Without the gradient the formula still needs the key; eta does not depend on it.
            state["grad"] = ops.zeros_like(state["param"])
        if chunk is not None:
            state = {
                k: v if isinstance(v, float) else ops.reshape(v, [-1])[chunk]
                for k, v in state.items()
            }
        return formulas.family(self.family).elementwise(ops, state, t, h, "keras")

    def _grads(
        self, grads: Sequence[Any] | None, variables: Sequence[Any] | None
    ) -> dict[int, Any]:
        """The gradients the step received, by variable index (clipped as Keras clips them)."""
        if grads is None:
            return {}
        opt = self.optimizer
        variables = self.variables() if variables is None else list(variables)
        pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
        # Keras unscales (loss_scale_factor), then clips, then casts to the variable dtype.
        scale = opt.loss_scale_factor or 1
        clipped = opt._clip_gradients([ops.convert_to_tensor(g) / scale for g, _ in pairs])
        return {
            opt._get_variable_index(v): ops.cast(g, v.dtype) for g, (_, v) in zip(clipped, pairs)
        }

    def report(
        self,
        *,
        distributions: bool = True,
        grads: Sequence[Any] | None = None,
        variables: Sequence[Any] | None = None,
        recorded: dict[int, dict[str, Any]] | None = None,
    ) -> StepReport:
        """StepReport of the last step that moved the variables."""
        notes = list(self.notes)
        _, t, _ = self.position()
        lr = self.learning_rate(t) if t else math.nan
        if not t:
            notes.append("no optimizer step has been taken yet (t = 0): inspect after "
                         "optimizer.apply()")
        group: dict[str, Any] = {"name": "pg0", "lr": lr}  # unknown step size and decay: NaN
        params: dict[str, ParamReport] = {}
        if self.family is not None and t:
            h = self.hyperparameters(lr)
            scalars = formulas.family(self.family).step_sizes(np, t, h, "keras")
            group["step_size"] = float(scalars.pop("step_size"))
            group["extra"] = {k: float(v) for k, v in scalars.items()}
            group["weight_decay_rate"] = lr * h["weight_decay"]
            if distributions and not self.unsupported:
                params = self._distributions(t, h, grads, variables, recorded, notes)
        if self.measured and distributions and t:
            params = self._realized(recorded or {}, notes)
        if not params:
            params = {
                v.path: ParamReport(name=v.path, shape=tuple(v.shape)) for v in self.variables()
            }
        return StepReport(
            t=t,
            optimizer=type(self.optimizer).__name__,
            framework="keras",
            family=self.family,
            groups=[GroupReport.combine(params, **group)],
            empirical=self.measured,
            notes=notes,
        )

    def _realized(self, recorded: dict[int, dict[str, Any]], notes: list[str]) -> dict[str, ParamReport]:
        """Empirical mode: |delta theta| of each variable copied before the step."""
        before = {i: r["param_before"] for i, r in recorded.items() if "param_before" in r}
        if not before:
            notes.append("empirical: no copy of the variables was taken before this step, so its "
                         "realized update is not measured (call monitor.before_step() before "
                         "optimizer.apply(); EffectiveLRCallback does)")
            return {}
        variables = self.variables()
        dtype = _float_dtype()
        measures = [partial(keras_stats.realized, ops.convert_to_tensor(variables[i]), copy, dtype)
                    for i, copy in before.items()]
        reports = {}
        for i, (dist, update_norm, param_norm) in zip(before, keras_stats.collect(measures)):
            var = variables[i]
            reports[var.path] = ParamReport(name=var.path, shape=tuple(var.shape), update_magnitude=dist,
                                            update_norm=update_norm, param_norm=param_norm)
        return reports

    def _distributions(
        self,
        t: int,
        h: dict[str, Any],
        grads: Sequence[Any] | None,
        variables: Sequence[Any] | None,
        recorded: dict[int, dict[str, Any]] | None,
        notes: list[str],
    ) -> dict[str, ParamReport]:
        if self.family == "adadelta" and not recorded and t != 1:
            notes.append(
                "Adadelta: the accumulated delta before the step was not recorded (use "
                "lrscope.keras.EffectiveLRCallback or watch()); its distribution is skipped"
            )
            return {}
        by_index = self._grads(grads, variables)
        if self.family in _ETA_NEEDS_GRAD and not by_index:
            notes.append(
                f"{type(self.optimizer).__name__}: eta depends on the gradient, which Keras "
                "does not keep: pass grads= (custom loops); distributions skipped"
            )
            return {}
        with_update = not _needs_grad(self.family, h) or bool(by_index)
        if not with_update:
            notes.append("Keras keeps no gradients: eta is exact, update norms need grads=")
        elif _needs_grad(self.family, h) and self.optimizer.gradient_accumulation_steps:
            notes.append(
                "with gradient accumulation, grads= must be the averaged accumulated gradients"
            )
        indices = [i for i in range(len(self.variables())) if not by_index or i in by_index]
        # (A variable without a gradient was skipped by Keras.)
        reports = [ParamReport(name=v.path, shape=tuple(v.shape))
                   for v in (self.variables()[i] for i in indices)]
        for report, (dist, update_norm, param_norm) in zip(
                reports, self._statistics(indices, t, h, by_index, recorded or {}, with_update)):
            report.effective_lr = dist
            report.update_norm, report.param_norm = update_norm, param_norm
        return {r.name: r for r in reports}

    def _statistics(self, indices: list[int], t: int, h: dict[str, Any], grads: dict[int, Any],
                    recorded: dict[int, dict[str, Any]], with_update: bool
                    ) -> list[tuple[Any, float | None, float]]:
        """(Distribution, update norm or None, param norm) of each variable of ``indices``:
        jitted on JAX (``keras_jax``), by the PyTorch backend's passes on torch
        (``keras_torch``), formula and statistics in one graph per chunk on TensorFlow
        (``keras_tensorflow``), else op by op (``keras_stats``)."""
        if BACKEND in ("jax", "torch", "tensorflow"):
            fast = importlib.import_module(f"lrscope.keras.backend_{BACKEND}")
            if fast.applies(self.family):
                inputs = [self.formula_inputs(i, t, h, grads.get(i), recorded.get(i)) for i in indices]
                return fast.collect(self.family, [s for s, _ in inputs], [hh for _, hh in inputs],
                                    t, with_update)
        dtype = _float_dtype()
        chunkable = formulas.chunkable(self.family)
        measures = []
        for index in indices:

            def compute(chunk: slice | None, index: int = index) -> Elementwise:
                return self.elementwise(index, t, h, grads.get(index), recorded.get(index), chunk)

            param = ops.convert_to_tensor(self.variables()[index])
            measures.append(partial(keras_stats.reduce, compute, param, with_update, dtype, chunkable))
        return keras_stats.collect(measures)
