"""The host side of the Optax monitor: StepReports from a state, ``OptaxMonitor`` and ``log``.

``lrscope.optax.monitor`` (``transform.py``) keeps the statistics inside the optimizer
state under ``jit``; this module finds them in any state (an ``nnx.Optimizer``, a Flax
``TrainState``), moves them to the host in one transfer and builds the StepReport.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable

import jax
import numpy as np
import optax

from lrscope._warnings import warn
from lrscope.jax import compact
from lrscope.jax.compact import carried_empty, uncarried
from lrscope.jax.stats import param_report, unstack_stats
from lrscope.monitor import Monitor
from lrscope.optax.model import MEASURED
from lrscope.optax.transform import GroupPlan, LrscopeState
from lrscope.report import GroupReport, StepReport
from lrscope.sinks import Sink, SinkGroup

def find_state(obj: Any) -> LrscopeState | None:
    """The LrscopeState in ``obj`` (a state, a chain's state, an nnx.Optimizer, a TrainState)."""
    if isinstance(obj, LrscopeState):
        return obj
    obj = getattr(obj, "opt_state", obj)
    is_state = lambda x: isinstance(x, LrscopeState)  # noqa: E731
    found = [x for x in jax.tree_util.tree_leaves(obj, is_leaf=is_state) if is_state(x)]
    if len(found) > 1:
        raise ValueError("this optimizer state holds several lrscope monitors; inspect each one")
    return found[0] if found else None


def hint(obj: Any) -> str | None:
    """What to do with an Optax object lrscope cannot read, or None for anything else."""
    if isinstance(obj, optax.GradientTransformation):
        return ("this is the Optax optimizer itself: build it with lrscope.optax.monitor(...) and "
                "pass its state (tx.init(params), or the opt_state that update() returns)")
    leaves = jax.tree_util.tree_leaves(obj, is_leaf=lambda x: x is not obj and _is_optax_state(x))
    if _is_optax_state(obj) or any(_is_optax_state(x) for x in leaves):
        return ("this Optax state carries no lrscope statistics: build the optimizer with "
                "lrscope.optax.monitor(optax.adamw, learning_rate=...) (its updates are bitwise "
                "the optimizer's) and pass that state")
    return None


def _is_optax_state(x: Any) -> bool:
    return type(x).__module__.startswith("optax.") and isinstance(x, tuple)


def accepts(obj: Any) -> bool:
    """Whether ``obj`` holds the state of ``lrscope.optax.monitor`` (for ``lrscope.inspect``)."""
    try:
        return find_state(obj) is not None
    except ValueError:
        return True  # inspect() will raise the explanation


def _host(state: LrscopeState) -> tuple[int, dict[str, dict[str, float]], dict[str, Any], int, int]:
    """One device-to-host transfer of the scalars and statistics (wrappers such as nnx
    Variables are looked through: the leaves are read in the plan's known order), and the
    number of replicas: a state replicated by ``jax.pmap`` has a leading device axis on every
    leaf, of which replica 0 is read."""
    template = (state.steps, {g.name: dict.fromkeys(g.scalar_names, 0) for g in state.plan.groups},
                {g.name: carried_empty(state.plan.stats_count(g)) for g in state.plan.groups},
                state.stats_step)
    leaves = jax.tree_util.tree_leaves((state.steps, state.scalars, state.stats, state.stats_step))
    host = jax.device_get(leaves)
    replicas = 1
    if np.ndim(host[0]):  # the step counter is a scalar unless pmap added a device axis
        replicas = len(host[0])
        host = [np.asarray(leaf)[0] for leaf in host]
    steps, scalars, stats, stats_step = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(template), host)
    return int(steps), scalars, stats, int(stats_step), replicas


def inspect(obj: Any) -> StepReport:
    """StepReport of the step just taken, from the state of ``lrscope.optax.monitor``."""
    report = _report(obj)
    if report is None:
        raise ValueError("no optimizer step has been taken yet (count == 0): inspect the state "
                         "returned by update()")
    return report


def _report(obj: Any) -> StepReport | None:
    """``inspect``'s report, or None before the first step (count == 0: the state of
    ``init``, or of ``optax.MultiSteps`` still accumulating its first gradients)."""
    state = find_state(obj)
    if state is None:
        raise TypeError("no lrscope statistics in this optax state: build the optimizer with "
                        "lrscope.optax.monitor(optax.adamw, learning_rate=...)")
    t, scalars, stats, stats_step, replicas = _host(state)
    if t == 0:
        return None
    fresh = stats_step == t
    groups, notes = [], []
    if replicas > 1:
        notes.append(f"a state replicated over {replicas} devices (jax.pmap): the report of "
                     "replica 0 (replicas agree when the gradients are averaged, e.g. by pmean)")
    families, measured_groups = set(), 0
    for g in state.plan.groups:
        values = {k: float(v) for k, v in scalars[g.name].items()}
        rows = unstack_stats(uncarried(stats[g.name]))
        dropped = int(stats[g.name].buckets.dropped)
        if fresh and dropped:
            notes.append(_dropped_note(g, dropped))
            warn(f"lrscope: {_dropped_note(g, dropped)}")
        # The last distributions' model check refuted the model (jax.stats.measured_if_refuted).
        refuted = not g.empirical and any(bool(s.measured) for s in rows)
        measured = g.empirical or refuted
        params = {}
        if fresh and state.plan.per_param:
            params = {n: param_report(n, shape, s) for n, shape, s in zip(g.leaves, g.shapes, rows)}
        extra = {} if measured else {k: v for k, v in values.items()
                                     if k not in ("lr", "step_size", "weight_decay_rate")}
        checked = fresh and not g.empirical and g.leaves and state.plan.check
        if checked and not math.isnan(values["lr"]):  # an unknown lr has its own note
            residual = max(float(s.model_residual) for s in rows)
            scale = max(float(s.update_max) for s in rows)
            extra["model_error"] = residual / scale if scale > 0 else float(residual > 0)
        notes.extend(g.notes)
        if refuted:
            notes.append(_refuted_note(g, values["lr"], extra.get("model_error")))
            warn(f"lrscope: group {g.name}: lrscope's {g.family} model does not reproduce the "
                 f"real update of this optimizer (its model check): the group is reported "
                 f"{MEASURED}; see the report's notes")
        # A measured-only group's step size and decay rate are unknown: NaN (SPEC §6).
        group = GroupReport.combine(
            params, name=g.name, lr=values["lr"],
            step_size=math.nan if measured else values.get("step_size", math.nan),
            weight_decay_rate=math.nan if measured else values["weight_decay_rate"], extra=extra)
        if fresh and not state.plan.per_param:  # the group's merged statistics
            merged = param_report(g.name, (), rows[0])
            for label in ("effective_lr", "update_magnitude", "update_norm", "param_norm"):
                setattr(group, label, getattr(merged, label))
        groups.append(group)
        families.add(None if measured else g.family)
        measured_groups += measured
    return StepReport(t=t, optimizer=state.plan.optimizer, framework="optax",
                      family=families.pop() if len(families) == 1 else None, groups=groups,
                      empirical=measured_groups > 0, notes=notes)


def _dropped_note(group: GroupPlan, dropped: int) -> str:
    """Why some bucket counts of a group are missing from its distributions."""
    return (f"group {group.name}: its tensors' values fill more float32 buckets than the state "
            f"has room for ({compact.PER_TENSOR} per tensor, {compact.SHARED} more per group, of which "
            f"a tensor measured by the compiled pass adds at most {compact.KEPT - compact.PER_TENSOR}): "
            f"{dropped} nonzero buckets' counts are missing from its distributions (min, max, "
            "mean, norms and eps-dominated count are exact; see lrscope.jax.compact)")


def _refuted_note(group: GroupPlan, lr: float, model_error: float | None) -> str:
    """Why a modelled group is reported measured-only: its model check failed."""
    if math.isnan(lr):
        why = (f"without its learning rate lrscope's {group.family} model cannot reproduce the "
               "real update")
    else:
        mismatch = "" if model_error is None else f" (relative mismatch {model_error:.2g})"
        why = f"lrscope's {group.family} model does NOT reproduce the real update{mismatch}"
    return (f"group {group.name}: {why}: the group is reported {MEASURED}; if you built this "
            "chain, pass its hyperparameters (and family=) to lrscope.optax.monitor, or it holds "
            "a transformation lrscope does not model (a stateless one is seen by this check only)")


class OptaxMonitor(Monitor):
    """Writes the report held in an optax state to sinks: call ``log(opt_state)`` per step."""

    def log(self, opt_state: Any) -> StepReport | None:
        """Build the report of ``opt_state`` and write it (once per step) to the sinks; None,
        writing nothing, before the first step (e.g. ``optax.MultiSteps`` accumulating)."""
        report = _report(opt_state)
        if report is None:
            return None
        report = self._named(report)
        if self.last is None or self.last.t != report.t:
            self._emit(report)
        return report


def watch(obj: Any, *, every: int = 1, log_dir: str | os.PathLike | None = None,
          sinks: Iterable[Sink] | None = None, name: str | None = None, findings: bool = True,
          distributed: bool | None = None, **options: Any) -> OptaxMonitor:
    """An OptaxMonitor for the monitored state ``obj`` (call ``mon.log(opt_state)`` each step).

    With several JAX processes (``jax.distributed.initialize``) every process's report is
    already the whole model's (the statistics are computed on global arrays), so only
    process 0 writes logs and checks findings; ``distributed=False`` lets every process
    write to its own ``log_dir``/``sinks``, as with one process.
    """
    if options:
        raise TypeError(f"unknown option(s) {sorted(options)} for the optax backend")
    state = find_state(obj)
    if state is None:
        raise TypeError("lrscope.watch needs the state of lrscope.optax.monitor(...)")
    if every not in (1, state.plan.every):
        raise ValueError("with optax the distributions are computed inside jit: pass every= to "
                         "lrscope.optax.monitor(...), not to watch()")
    if distributed is not False and jax.process_index() != 0:
        log_dir, sinks, findings = None, [], False
    return OptaxMonitor(every=state.plan.every, log_dir=log_dir, sinks=sinks, name=name,
                        findings=findings)


def log(opt_state: Any, to: OptaxMonitor | Sink | Iterable[Sink]) -> StepReport | None:
    """Write the report of ``opt_state`` to a monitor, a sink or several sinks; return it
    (None, writing nothing, before the first step)."""
    if isinstance(to, (str, os.PathLike)):
        raise TypeError("to log into a directory, create the monitor once: "
                        "mon = lrscope.watch(opt_state, log_dir=...), then mon.log(opt_state) "
                        "every step")
    if isinstance(to, OptaxMonitor):
        return to.log(opt_state)
    report = _report(opt_state)
    if report is not None:
        SinkGroup([to] if isinstance(to, Sink) else list(to)).write(report)
    return report
