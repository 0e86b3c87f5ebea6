"""Keras 3 backend: read a Keras optimizer's variables, compute with ``keras.ops``.

Written with ``keras.ops``, so it runs on the tensorflow, jax and torch backends; the
statistics take each backend's fast path where it has one (``_statistics``): one jitted
computation on JAX (``backend_jax``), lrscope's PyTorch passes on torch (``backend_torch``),
one ``tf.function`` graph per step on TensorFlow (``backend_tensorflow``).
Conventions (SPEC §2): after step t ``optimizer.iterations == t`` and the schedule was
evaluated at the raw iteration ``t - 1`` (with ``gradient_accumulation_steps = k``,
Keras counts micro-batches: the step moved the variables at raw iteration ``t*k - 1``);
eps placement per family is in ``lrscope.formulas``.  Keras keeps no gradients after
the step: families whose direction needs g (SGD without momentum or with Nesterov,
RMSprop without momentum, Adagrad, Adadelta, Nadam, Lion, ScheduleFreeAdamW) report exact
eta and leave the update norms out unless ``grads=`` is passed.  Supported: the 14 Keras
3.15 optimizers, Adam, AdamW, SGD, RMSprop, Adagrad, Adamax, Nadam, Adadelta, Lion, Lamb,
Adafactor (eta needs ``grads=``), Ftrl, Muon (two groups, "muon" and "adam"),
ScheduleFreeAdamW, and MultiOptimizer (``lrscope.keras.multi``); which class is which
family, and what the newer ones need, is in ``lrscope.keras.models``.  Any other class,
or an option lrscope does not model: lr only, with a note, and in empirical mode the
realized update, |delta theta| from a copy of the variables taken before the step.

(Over 500 lines: one class, ``KerasReader``, whose steps — position, hyperparameters,
formula inputs per family, groups, statistics — all read the same optimizer's variables and
share its caches; the per-family tables and the fast paths are already in their own modules.)
"""

from __future__ import annotations

import importlib
import math
from functools import partial
from dataclasses import dataclass, field
from typing import Any, Sequence

import keras
import numpy as np
from keras import ops

from lrscope import formulas
from lrscope.keras import models, stats as keras_stats
from lrscope.formulas import Elementwise
from lrscope.report import GroupReport, ParamReport, StepReport

_OPT = keras.optimizers
#: Base-optimizer config keys that leave the update rule as modelled.
_NEUTRAL_CONFIG = {"name", "learning_rate", "weight_decay", "clipnorm", "global_clipnorm",
                   "clipvalue", "use_ema", "ema_momentum", "ema_overwrite_frequency",
                   "loss_scale_factor", "gradient_accumulation_steps"}
#: Families whose eta itself depends on the gradient (Adafactor's update clipping).
_ETA_NEEDS_GRAD = {"adafactor"}
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
    """The family modelled exactly, or None (another class, or one overriding update_step or,
    for Muon, another method of its step)."""
    cls = type(optimizer)
    for base in cls.__mro__:
        if base in models.FAMILY_OF:
            family = models.FAMILY_OF[base]
            methods = ("update_step", *models.STEP_METHODS.get(family, ()))
            same = all(getattr(cls, m) is getattr(base, m) for m in methods)
            return family if same else None
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


@dataclass
class Group:
    """The variables (indices into the optimizer's) one update rule moves: a report group.
    ``path`` picks Muon's rule ("muon" or "adam"); None for the other families."""

    name: str
    indices: list[int] = field(default_factory=list)
    path: str | None = None


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
        known = {*models.HYPER[self.family].values(), *models.MODELLED_CONFIG.get(self.family, ())}
        out = [
            f"{k}={v!r}"
            for k, v in opt.get_config().items()
            if k not in _NEUTRAL_CONFIG and k not in known and v not in (None, False, 0)
        ]
        if opt.use_ema and opt.ema_overwrite_frequency:
            out.append(f"ema_overwrite_frequency={opt.ema_overwrite_frequency}")
        return out

    @property
    def accumulation_steps(self) -> int | None:
        """Keras' ``gradient_accumulation_steps`` (micro-batches per step), or None."""
        return self.optimizer.gradient_accumulation_steps

    def history(self) -> tuple[str, str] | None:
        """What ``record_before`` copies for a report, as (what it is, what is skipped
        without it), or None: Adadelta's accumulated delta and, in empirical mode, the
        variables (without them no distributions); for Ftrl, and Muon with Nesterov, the
        variables whose direction is measured (without them no update norms)."""
        if self.measured:
            return "the variables", "distributions skipped"
        if self.family == "adadelta":
            return "eta needs the accumulated delta", "distributions skipped"
        if self.family == "ftrl" or (self.family == "muon" and self.optimizer.nesterov):
            return "d needs the variables", "update norms skipped"
        return None

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
        try:
            return _float(self.optimizer.learning_rate)
        except AttributeError:  # a MultiOptimizer subclass has none: its optimizers have theirs
            return math.nan

    def weight_decay(self, lr: float) -> float:
        """The weight decay as the formulas take it (they remove ``lr * weight_decay`` of
        theta), with its backend's roundings.

        TensorFlow casts the Python ``weight_decay`` through float32; torch computes
        ``1 - wd * lr`` in float32 (lr is a float32 tensor).  Those roundings change the
        decay by up to 1e-3 relative, so they are modelled.  (Elsewhere the value does not
        depend on lr: ``keras_jax`` compiles again when it changes.)  Muon applies its
        decay itself (``models.muon_weight_decay``).
        """
        if self.family in models.OWN_WEIGHT_DECAY:
            return models.muon_weight_decay(self.optimizer.weight_decay)
        wd = float(self.optimizer.weight_decay or 0.0)
        if wd == 0 or lr == 0:
            return 0.0
        f32 = np.float32
        if BACKEND == "torch":
            return (1.0 - float(f32(1.0) - f32(f32(wd) * f32(lr)))) / lr
        if BACKEND == "tensorflow":
            return float(f32(wd))
        return wd

    def hyperparameters(self, lr: float, group: Group | None = None, t: int | None = None) -> dict[str, Any]:
        """The formula's hyperparameters of ``group`` at step ``t`` (lr the schedule's)."""
        opt = self.optimizer
        given = {name: getattr(opt, attribute) for name, attribute in models.HYPER[self.family].items()}
        rounded = models.CAST if BACKEND == "tensorflow" else models.TORCH_FLOAT32 if BACKEND == "torch" else {}
        for name in rounded.get(self.family, ()):
            given[name] = float(np.float32(given[name]))
        given["weight_decay"] = self.weight_decay(lr)
        if self.family == "muon":
            given["adam_weight_decay"] = models.muon_weight_decay(opt.adam_weight_decay)
            given["adam_lr"] = models.muon_adam_lr(lr, opt.adam_lr_ratio)
            given["path"] = group.path if group is not None and group.path else "muon"
        elif self.family == "schedule_free":
            given["aliased_z"] = BACKEND in models.ALIASED_Z_BACKENDS
            if t:
                given["scheduled_lr"] = models.schedule_free_lr(lr, t, opt.warmup_steps, self._dtype())
        return formulas.hyperparameters(self.family, "keras", lr=lr, **given)

    def _dtype(self) -> str:
        """The dtype of the optimizer's variables (float32 before it is built)."""
        variables = self.variables()
        return keras.backend.standardize_dtype(variables[0].dtype) if variables else "float32"

    def variables(self) -> list[Any]:
        return list(getattr(self.optimizer, "_trainable_variables", []))

    def groups(self) -> list[Group]:
        """The report's groups: one ("pg0"), or Muon's "muon" and "adam" (those that have
        variables)."""
        indices = list(range(len(self.variables())))
        if self.family != "muon" or not indices:
            return [Group("pg0", indices)]
        variables = self.variables()
        muon = [i for i in indices if models.on_muon_path(self.optimizer, i, variables[i])]
        adam = [i for i in indices if i not in muon and self.optimizer.momentums[i] is not None]
        return [g for g in (Group("muon", muon, "muon"), Group("adam", adam, "adam")) if g.indices]

    def state_of(self, index: int) -> dict[str, Any]:
        state = {}
        for name, attribute in models.STATE[self.family].items():
            slots = getattr(self.optimizer, attribute, None)
            if slots and slots[index] is not None:
                state[name] = ops.convert_to_tensor(slots[index])
        if self.family == "nadam":
            state["mu_product"] = _float(self.optimizer._u_product)
        return state

    def _indexed(self, variables: Sequence[Any] | None) -> list[tuple[int, Any]]:
        """``(index, variable)`` of ``variables`` (default the optimizer's); an optimizer not
        yet built will be built with them, in their order."""
        if variables is None:
            return list(enumerate(self.variables()))
        if self.optimizer.built:
            return [(self.optimizer._get_variable_index(v), v) for v in variables]
        return list(enumerate(variables))

    def record_before(self, variables: Sequence[Any] | None = None) -> dict[int, dict[str, Any]]:
        """What the coming step overwrites and the report needs, by variable index
        (``history``): Adadelta's deltas; a copy of each variable (``param_before``) in
        empirical mode and for Ftrl, of each matrix on Muon's path with Nesterov.
        ``variables``: those the coming ``apply`` updates, in its order (an optimizer not
        yet built is built with them); default the optimizer's."""
        opt = self.optimizer
        if self.measured or self.family == "ftrl":
            indexed = self._indexed(variables)
        elif self.family == "muon" and opt.nesterov:
            indexed = [(i, v) for i, v in self._indexed(variables)
                       if models.on_muon_path(opt, i if opt.built else None, v)]
        elif self.family == "adadelta" and opt.built:
            return {i: {"acc_delta_before": ops.copy(ops.convert_to_tensor(a))}
                    for i, a in enumerate(opt._accumulated_delta_vars)}
        else:
            return {}
        return {i: {"param_before": ops.copy(ops.convert_to_tensor(v))} for i, v in indexed}

    def formula_inputs(
        self, index: int, t: int, h: dict[str, Any], grad: Any, recorded: dict[str, Any] | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The formula's state of variable ``index`` (PyTorch names, ``param`` after the
        step, ``grad`` None when not given) and its hyperparameters.  Per-step scalars
        (Muon's ``adam_lr``, schedule-free's ``scheduled_lr``) go with the state, so that a
        compiled caller takes them as inputs."""
        var = self.variables()[index]
        param = ops.convert_to_tensor(var)
        state = {**self.state_of(index), **(recorded or {}), "param": param, "grad": grad}
        if self.family == "adadelta" and "acc_delta_before" not in state and t == 1:
            state["acc_delta_before"] = ops.zeros_like(param)  # Keras starts it at zero
        if not self.optimizer._use_weight_decay(var):
            h = {**h, "weight_decay": 0.0, **({"adam_weight_decay": 0.0} if self.family == "muon" else {})}
        for name in ("adam_lr", "scheduled_lr"):
            if h.get(name) is not None:
                state[name], h = h[name], {**h, name: None}
        if self.family == "muon" and h["path"] == "muon":
            before = state.pop("param_before", None)
            state["orthogonalized"], _ = models.orthogonalized(self.optimizer, index, grad, before, h, param)
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

    def each_elementwise(
        self,
        grads: Sequence[Any] | None = None,
        variables: Sequence[Any] | None = None,
        recorded: dict[int, dict[str, Any]] | None = None,
    ) -> list[tuple[str, Elementwise]]:
        """``(variable path, Elementwise)`` of every variable of the last step."""
        if self.family is None or self.unsupported:
            raise TypeError(self.notes[0])
        _, t, _ = self.position()
        lr = self.learning_rate(t)
        by_index = self._grads(grads, variables)
        out = []
        for group in self.groups():
            h = self.hyperparameters(lr, group, t)
            for index in group.indices:
                out.append((self.variables()[index].path,
                            self.elementwise(index, t, h, by_index.get(index), (recorded or {}).get(index))))
        return out

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

    def group_scalars(self, lr: float, t: int, group: Group) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the GroupReport's scalars, the formula's hyperparameters) of ``group``: the lr
        the step applied to it (schedule-free's warmed-up lr, Muon's Adam path's
        ``lr * adam_lr_ratio``) and where it comes from, step size, extras, decay rate."""
        h = self.hyperparameters(lr, group, t)
        scalars = formulas.family(self.family).step_sizes(np, t, h, "keras")
        out: dict[str, Any] = {"name": group.name, "lr": lr}
        out["step_size"] = float(scalars.pop("step_size"))
        out["extra"] = {k: float(v) for k, v in scalars.items()}
        wd = h["adam_weight_decay"] if group.path == "adam" else h["weight_decay"]
        out["weight_decay_rate"] = lr * wd  # Keras' decays all use the (un-warmed) lr
        if self.family == "schedule_free" and h["warmup_steps"] > 0:
            out["lr"], out["lr_source"] = h["scheduled_lr"], "lr*min(1,t/warmup_steps)"
        elif group.path == "adam" and h["adam_lr_ratio"] != 1:
            out["lr"], out["lr_source"] = h["adam_lr"], "lr*adam_lr_ratio"
        return out, h

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
        groups = []
        for group in self.groups():
            scalars: dict[str, Any] = {"name": group.name, "lr": lr}  # unknown step size, decay: NaN
            params: dict[str, ParamReport] = {}
            if self.family is not None and t:
                scalars, h = self.group_scalars(lr, t, group)
                if distributions and not self.unsupported:
                    params = self._distributions(t, h, group, grads, variables, recorded, notes)
            if self.measured and distributions and t:
                params = self._realized(group.indices, recorded or {}, notes)
            if not params:
                params = {v.path: ParamReport(name=v.path, shape=tuple(v.shape))
                          for v in (self.variables()[i] for i in group.indices)}
            groups.append(GroupReport.combine(params, **scalars))
        return StepReport(
            t=t,
            optimizer=type(self.optimizer).__name__,
            framework="keras",
            family=self.family,
            groups=groups,
            empirical=self.measured,
            notes=notes,
        )

    def _realized(self, indices: list[int], recorded: dict[int, dict[str, Any]],
                  notes: list[str]) -> dict[str, ParamReport]:
        """Empirical mode: |delta theta| of each variable of ``indices`` copied before the step."""
        before = {i: recorded[i]["param_before"] for i in indices if "param_before" in recorded.get(i, {})}
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

    def _update_known(self, h: dict[str, Any], group: Group, indices: list[int], grads: dict[int, Any],
                      recorded: dict[int, dict[str, Any]], notes: list[str]) -> bool:
        """Whether the update of every variable of ``indices`` is known (the update norms),
        with a note where it is not or where it is measured."""
        name = type(self.optimizer).__name__
        copied = bool(indices) and all("param_before" in recorded.get(i, {}) for i in indices)
        if self.family == "ftrl" or (group.path == "muon" and h["nesterov"] and not grads):
            if self.family == "muon" and copied:
                notes.append(f"{name}: d of the muon group (the orthogonalized update) is measured "
                             "from the copy of the matrices taken before the step (no grads=)")
            if not copied:
                what = ("d (the orthogonalized update) needs grads= or" if self.family == "muon"
                        else "d needs")
                notes.append(f"{name}: eta is exact; {what} a copy of the variables taken before the "
                             "step (monitor.before_step(), which EffectiveLRCallback calls): update "
                             "norms left out")
            return copied
        if group.path is not None or not _needs_grad(self.family, h) or grads:
            if grads and _needs_grad(self.family, h) and self.optimizer.gradient_accumulation_steps:
                notes.append("with gradient accumulation, grads= must be the averaged accumulated "
                             "gradients")
            return True
        notes.append("Keras keeps no gradients: eta is exact, update norms need grads=")
        return False

    def _distributions(
        self,
        t: int,
        h: dict[str, Any],
        group: Group,
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
        # (A variable without a gradient was skipped by Keras.)
        indices = [i for i in group.indices if not by_index or i in by_index]
        with_update = self._update_known(h, group, indices, by_index, recorded or {}, notes)
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
        jitted on JAX (``backend_jax``), by the PyTorch backend's passes on torch
        (``backend_torch``), formula and statistics of every variable in one graph on TensorFlow
        (``backend_tensorflow``), else op by op (``lrscope.keras.stats``)."""
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
