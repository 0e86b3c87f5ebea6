"""``TorchReader``: the StepReport of a ``torch.optim`` step, read from the optimizer's state.

The report of a step: scalars from the param groups (the optimizer's family and
hyperparameters from ``optimizers``), distributions computed on the state's device
(``stats``, ``small``, ``fused``).
``lrscope.torch.monitor`` calls it from the step hooks, ``inspect`` on its own.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator

import numpy as np
import torch

from lrscope import formulas, registry
from lrscope.torch import deepspeed, distributed, fused, published, small, stats
from lrscope.torch.optimizers import _number_or_nan, _parameter_names, group_name, hyperparameters, unwrap
from lrscope.torch.schedule_free import Wrapped
from lrscope.torch.state import (RECORD_BEFORE, RECORD_REQUIRED, apply_formula, as_float, canonical, host_scalars,
                                  is_sharded, local, record_before, state_view)
from lrscope.formulas import Elementwise
from lrscope.report import GroupReport, ParamReport, StepReport

SKIPPED_NOTE = ("GradScaler skipped this step (inf/NaN gradients): parameters did not move and "
                "t did not advance")
#: Said in the report when parameters are DTensors: statistics are per rank, read without
#: communication (a monitor on one rank alone must not wait for the others).
SHARDED_NOTE = ("sharded parameters (DTensor, e.g. FSDP2): the distributions and norms are those "
                "of this rank's shards; each rank reports its own")
#: Says that a group's hyperparameters could not be modelled at this step (``TorchReader``).
OUT_OF_RANGE = "hyperparameters lrscope cannot model at this step"
def accepts(obj: Any) -> bool:
    return isinstance(unwrap(obj), torch.optim.Optimizer)


def hint(obj: Any) -> str | None:
    """What to do with a torch object lrscope cannot read, or None for anything else."""
    keras = sys.modules.get("keras")
    if isinstance(obj, torch.nn.Module) and not (keras and isinstance(obj, keras.Model)):  # Keras' own
        return ("this is the model: pass its optimizer, and the model as model= for the tensors' "
                "names (lrscope.watch(optimizer, model=model))")
    return None


@dataclass(slots=True)
class _Pending:
    """What the pre-hook recorded for the coming step: each group's lr and options (a
    scheduler may change them before the report is built), and per-parameter values; and
    what the post-hook recorded of a schedule-free wrapper's groups (``TorchReader.end``)."""

    lrs: list[Any]
    groups: list[dict[str, Any]] = field(default_factory=list)
    recorded: dict[int, dict[str, Any]] = field(default_factory=dict)
    snapshot: dict[int, torch.Tensor] = field(default_factory=dict)
    wrapper_scalars: list[dict[str, float]] | None = None


@dataclass
class _GroupParts:
    """A group's report before its statistics reach the host (``TorchReader._group``)."""

    name: str
    lr: float
    lr_source: str = "lr"
    extra: dict[str, float] = field(default_factory=dict)
    params: list[torch.Tensor] = field(default_factory=list)
    stats: dict[str, Callable[[bool], Any]] = field(default_factory=dict)
    fragments: list[Any] | None = None  # DeepSpeed ZeRO, FSDP1: the model parameters' fragments
    label: str = "effective_lr"
    counter: Any = None  # the step counter as the state holds it
    h: dict[str, Any] = field(default_factory=dict)  # canonical hyperparameters (modelled families)
    unknown: str | None = None  # why the model's scalars are unknown at this step (registry.Unknown)


class TorchReader:
    """Turns a torch optimizer's state into StepReports.

    ``warn``, if given (a monitor's), is called once per kind of problem found at a step
    (options lrscope does not model, hyperparameters out of its range, an unreadable lr);
    the report's notes say it on every step concerned.
    """

    def __init__(self, optimizer: Any, model: Any = None, empirical: bool = False,
                 warn: Callable[[str], None] | None = None):
        self.warn = warn
        self._warned: set[str] = set()
        # In a run of several processes: which local elements this rank counts; ``merging``
        # (set by a monitor that merges the ranks' reports) measures only those.
        self.membership = distributed.Membership.of(optimizer)
        self.merging = False
        # DeepSpeed ZeRO, FSDP1: the model's parameters are fragments of the flat tensors it steps.
        self.zero = optimizer if deepspeed.is_zero(optimizer) else None
        self.fragments = (partial(deepspeed.fragments, self.zero) if self.zero is not None
                          else distributed.fsdp1_fragments(model))
        # schedulefree's wrapper: its base optimizer's step is the z-step (``schedule_free``).
        self.wrapped = Wrapped.of(optimizer)
        self.optimizer = unwrap(optimizer)
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.registration = registry.model_for(type(self.optimizer))
        self.family = None if self.registration is None else self.registration.family
        self._per_step_cache: tuple[Any, Any] = (None, None)
        # Families whose optimizers may keep no state at all: a tensor without state moved.
        self.stateless = self.family == "sgd" or getattr(
            formulas.family(self.family) if self.family else None, "STATELESS", False)
        # A family whose formulas never read t (SGD: torch keeps no step counter for it).
        self.stepless = self.family is not None and not getattr(
            formulas.family(self.family), "USES_STEP", True)
        self.empirical = empirical
        self.model = model
        self._named = (deepspeed.model_groups(self.zero) if self.zero is not None else
                       optimizer if distributed.partitioned(optimizer) else self.optimizer)
        self.names = _parameter_names(model, self._named)
        self.notes: list[str] = []
        if self.family is None:
            cls = type(self.optimizer)
            where = "" if cls.__module__.startswith("torch.optim") else f"{cls.__module__}."
            what = (f"{where}{cls.__qualname__} is not a torch.optim optimizer lrscope models "
                    "exactly (or it overrides step())")
            self.notes.append(
                f"{what}: only its lr is reported (the group's 'lr' key, or the applied lr it "
                "publishes: lr_source says which); its step size and decay rate are unknown (NaN, "
                "not logged)"
                + ("; its realized update is measured instead (empirical=True: one copy of the "
                   "parameters on each measured step; empirical=False turns it off)" if empirical else
                   "; pass empirical=True to measure the realized update (costs one copy of the "
                   "parameters per measured step)")
            )

    def name_of(self, p: torch.Tensor) -> str:
        """``p``'s name in the model, else ``param<i>`` by its position in the groups; a
        parameter added since (``add_param_group``, unfreezing layers) is named on sight,
        and the names already given stay."""
        if id(p) not in self.names:
            self.names = {**_parameter_names(self.model, self._named), **self.names}
        return self.names[id(p)]

    def begin(self, t_next: int, distributions: bool) -> _Pending:
        groups = self.optimizer.param_groups
        pending = _Pending(lrs=[g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
                                for g in groups],
                           groups=[dict(g) for g in groups])  # (a C copy; "params" is replaced on read)
        records = self.family in RECORD_BEFORE or (self.family is None and self.empirical)
        if not (records and distributions):
            return pending
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if self.family is None:
                    # Every trainable one: LBFGS-style step(closure) computes the grads inside.
                    if p.requires_grad or p.grad is not None:
                        pending.snapshot[id(p)] = local(p.detach()).clone()
                elif p.grad is not None:
                    pending.recorded[id(p)] = record_before(self.family, self.optimizer.state.get(p),
                                                             p, group)
        return pending

    def end(self, pending: _Pending | None) -> None:
        """What the post-hook records: a schedule-free wrapper's scalars of each group
        (``ckp1``), read before the wrapper's step goes on to update its keys.  Never raises:
        where they cannot be read, the report says so."""
        if pending is None:
            return
        try:
            pending.wrapper_scalars = [self.wrapped.scalars(group, lr, stepping=True)
                                       for group, lr in zip(self.optimizer.param_groups, pending.lrs)]
        except Exception:  # noqa: BLE001 - the user's values: the report's ckp1 is then unknown
            pending.wrapper_scalars = None

    def report(self, pending: _Pending | None, distributions: bool, t: int | None = None,
               found_inf: torch.Tensor | None = None, stepping: bool = False) -> StepReport:
        """StepReport of the last step; ``t`` is the caller's count (None: read the counters);
        ``stepping``: called inside the step (its post-hook: a schedule-free wrapper's step
        has not finished).

        On a measured step the statistics of every group and the groups' step counters
        that live on a device reach the host in one transfer per device (``stats.collect``),
        with ``found_inf``, GradScaler's flag on which a fused step skips itself
        (a skipped step is then marked as such; its distributions describe the state it left
        unchanged).
        """
        notes = list(self.notes)
        if pending is None:
            notes.append("lr read from param_groups after the step: if a scheduler stepped since, "
                          "this is the next step's lr (watch() records the lr the step used)")
        if t is None and not distributions:
            t = self._step_count()
        parts = []
        for index, after in enumerate(self.optimizer.param_groups):
            lr, group = after.get("lr"), after
            if pending is not None and pending.groups:
                lr, group = pending.lrs[index], {**pending.groups[index], "params": after["params"]}
            parts.append(self._group(index, group, lr, pending, distributions, notes, after, stepping))
        counters: dict[Any, Any] = {index: part.counter for index, part in enumerate(parts)
                                    if part.counter is not None}
        if distributions and found_inf is not None:
            counters["found_inf"] = found_inf
        host, counters = stats.collect(
            {name: measure for part in parts for name, measure in part.stats.items()}, counters)
        skipped = bool(counters.pop("found_inf", 0))
        # A measured step re-syncs with the state's counters (they move with load_state_dict).
        t = max(counters.values(), default=0) or t or 0
        if not t and self.stepless:
            notes.append(f"{type(self.optimizer).__name__} keeps no step counter: t is unknown to "
                         "inspect() and reported as 0 (watch() counts the steps)")
        elif not t and self.family is not None and not any(self.optimizer.state.values()):
            notes.append("no optimizer step has been taken yet (t = 0): inspect after "
                         "optimizer.step()")
        groups = [self._finish(part, host, counters.get(index) or t) for index, part in enumerate(parts)]
        if skipped:
            notes.append(SKIPPED_NOTE)
        return StepReport(t=t, optimizer=type(self.optimizer).__name__, framework="torch",
                          family=self.family, groups=groups, empirical=self.family is None and self.empirical,
                          notes=notes, skipped=skipped)

    def fallback(self, pending: _Pending | None, t: int, error: Exception) -> StepReport:
        """The report of step ``t`` when building it raised ``error`` (``Monitor.guarded``):
        each group's lr where it can be read, everything else unknown (NaN).  Never raises."""
        groups = []
        for index, group in enumerate(self.optimizer.param_groups):
            try:
                lr = pending.lrs[index] if pending is not None else group.get("lr")
                name = group_name(group, index)
                if self.family is None:
                    value, source, extra, _ = published.applied_lr(
                        pending.groups[index] if pending is not None and pending.groups else group,
                        group, lr, before_step=bool(pending is not None and pending.groups))
                    groups.append(GroupReport(name=name, lr=value, lr_source=source, extra=extra))
                else:
                    groups.append(GroupReport(name=name, lr=_number_or_nan(lr)))
            except Exception:  # noqa: BLE001 - an unreadable group still has its place
                groups.append(GroupReport(name=f"pg{index}"))
        note = (f"measuring this step failed ({type(error).__name__}: {error}): t and lr only, "
                "everything else unknown")
        return StepReport(t=t, optimizer=type(self.optimizer).__name__, framework="torch",
                          family=self.family, groups=groups, notes=[*self.notes, note])

    def _problem(self, kind: str, note: str, notes: list[str]) -> None:
        """A note on what could not be measured; the first of its kind is also warned."""
        notes.append(note)
        if self.warn is not None and kind not in self._warned:
            self._warned.add(kind)
            self.warn(f"lrscope: {note} (warned once: the report notes each step concerned; "
                      "training is not affected)")

    def _group(self, index: int, group: dict[str, Any], lr: Any, pending: _Pending | None,
               distributions: bool, notes: list[str], after: dict[str, Any], stepping: bool) -> _GroupParts:
        """What a group's report needs from the device: its statistics, not yet moved.

        ``group`` is the group as the step found it (``after`` as it left it); ``lr`` its lr
        key at the step."""
        name = group_name(group, index)
        group, unsupported = self._base_group(group)
        if self.family is None:
            value, source, extra, note = published.applied_lr(group, after, lr, before_step=bool(
                pending is not None and pending.groups))
            part = _GroupParts(name, value, lr_source=source, extra=extra)
            if note is not None:
                notes.append(f"group {name}: {note}")
        else:
            part = _GroupParts(name, _number_or_nan(lr))
        if self.wrapped is not None:
            part.extra.update(self._wrapper_scalars(index, after, lr, pending, notes))
        if self.family is not None:
            try:
                part.h, own = hyperparameters(self.family, group, lr, model=self.registration,
                                              step=self._group_step(index, pending))
                unsupported += own
            except registry.Unknown as unknown:
                part.unknown = str(unknown)
                notes.append(f"group {part.name}: {unknown}; its step size, decay rate and "
                             "distributions are unknown (NaN) for the step")
                return part
            except Exception as error:  # noqa: BLE001 - the user's values, not lrscope's bug
                part.unknown = f"{OUT_OF_RANGE} ({type(error).__name__}: {error})"
                self._problem("range", f"group {name}: {part.unknown}: its step size, decay rate and "
                              "distributions are unknown (NaN) for the step", notes)
                return part
            if self.registration is not None and self.registration.scalars is not None:
                part.lr = as_float(part.h["lr"])  # the lr the step applied, where the model reads it
                part.lr_source = self.registration.lr_source
        if unsupported:
            self._problem("unsupported", f"group {name}: option(s) {', '.join(unsupported)} not "
                          "modelled by lrscope; distributions skipped rather than mis-modelled",
                          notes)
        if not distributions:  # scalars-only steps touch no parameter: O(1) per group
            return part
        part.params = [p for p in group["params"] if p.grad is not None]
        part.counter = self._counter(part.params, index)
        if self.merging and self.fragments is None:  # the others are counted on another rank
            part.params = [p for p in part.params if self.membership.counts(p)]
        if any(is_sharded(p) for p in part.params):
            if SHARDED_NOTE not in notes and not self.merging:
                notes.append(SHARDED_NOTE)
            if self.family is not None and not formulas.chunkable(self.family):
                notes.append(f"group {part.name}: {self.family} needs whole tensors, and its "
                             "parameters are sharded (DTensor): distributions skipped")
                return part
        if unsupported:
            return part
        if self.family is None:
            part.label = "update_magnitude"
            if self.empirical and pending is not None:
                part.stats = {self.name_of(p): partial(stats.realized, local(p), pending.snapshot[id(p)])
                              for p in part.params if id(p) in pending.snapshot}
            return part
        items = {}
        if self.fragments is not None:
            fragments = {flat: [f for f in fs if f.counted or not self.merging]
                         for flat, fs in self.fragments().items()}
            part.fragments = [f for flat in part.params for f in fragments.get(id(flat), [])]
            if not formulas.chunkable(self.family):
                notes.append(f"group {part.name}: {self.family} needs whole tensors, and "
                             f"{'DeepSpeed' if self.zero is not None else 'FSDP1'} holds them in flat "
                             "shards: distributions skipped")
                return part
            for flat in part.params:
                state = self.optimizer.state.get(flat, {})
                for fragment in fragments.get(id(flat), []) if state else []:
                    theta = fragment.view(flat)
                    items[fragment.name or self.name_of(fragment.param)] = (self._per_chunk(
                        deepspeed.fragment_state(state, flat, fragment), theta, part.h, None, part.counter),
                        canonical(theta.detach()))
            part.stats = small.measures(items)
            return part
        for p in part.params:
            state, theta = self._state(p, stepping)
            if not state and not self.stateless:  # (plain SGD keeps none: it always moves)
                continue
            recorded = pending.recorded.get(id(p)) if pending is not None else None
            if self.family in RECORD_REQUIRED and not recorded:
                notes.append(f"{type(self.optimizer).__name__}: the state the step overwrote was "
                             "not recorded (use watch()); distributions skipped")
                break
            items[self.name_of(p)] = (self._per_chunk(state, p, part.h, recorded, part.counter, theta),
                                      canonical(theta.detach()))
        part.stats = small.measures(items)
        return part

    def _finish(self, part: _GroupParts, host: dict[str, Any], t: int) -> GroupReport:
        """The group's report from its statistics on the host, at step ``t``.  Only a
        modelled family sets a step size and a decay rate (unknown: NaN, the defaults)."""
        scalars: dict[str, Any] = {"name": part.name, "lr": part.lr, "lr_source": part.lr_source,
                                   "extra": part.extra}
        if self.family is None:
            return GroupReport.combine(self._param_reports(part, host), **scalars)
        if part.unknown is not None:
            return GroupReport.combine(self._param_reports(part, {}), step_size=math.nan,
                                       weight_decay_rate=math.nan, **scalars)
        h = part.h
        # t == 0: no step taken yet, or a stepless family read by inspect().
        known = bool(t) or self.stepless
        host_h = {**h, "lr": part.lr}
        family_scalars = formulas.family(self.family).step_sizes(
            np, t, host_h, "torch") if known else {"step_size": math.nan}
        scalars["step_size"] = as_float(family_scalars.pop("step_size"))
        scalars["extra"] = {**part.extra, **{k: as_float(v) for k, v in family_scalars.items()}}
        scalars["weight_decay_rate"] = self._decay_rate(h, scalars["step_size"])
        return GroupReport.combine(self._param_reports(part, host if known else {}), **scalars)

    def elementwise(self, pending: _Pending | None = None) -> Iterator[tuple[str, Elementwise]]:
        """``(name, Elementwise)`` of every parameter the last step moved, exactly as the
        report computes them (the model's hooks included), whole tensors at once; with
        ``pending`` (``begin``'s record before the step), from the lr and groups as the step
        found them, else from the groups now.  Options not modelled raise ValueError,
        unknown scalars ``registry.Unknown``."""
        if self.family is None:
            raise TypeError(self.notes[0])
        for index, after in enumerate(self.optimizer.param_groups):
            lr, group = after["lr"], after
            if pending is not None and pending.groups:
                lr, group = pending.lrs[index], {**pending.groups[index], "params": after["params"]}
            group, unsupported = self._base_group(group)
            h, own = hyperparameters(self.family, group, lr, model=self.registration,
                                     step=self._group_step(index, pending))
            unsupported += own
            if unsupported:
                raise ValueError(f"option(s) {', '.join(unsupported)} are not modelled by lrscope")
            params = [p for p in after["params"] if p.grad is not None]
            counter = self._counter(params, index)
            for p in params:
                state, theta = self._state(p, stepping=False)
                if state or self.stateless:
                    recorded = pending.recorded.get(id(p)) if pending is not None else None
                    by_group = self.registration is not None and self.registration.counter is not None
                    view, t = self.view(state, p, h, recorded, counter if by_group else None, theta)
                    yield self.name_of(p), apply_formula(self.family, view, t, h, p.dtype)

    def _formula_hyperparameters(self, h: dict[str, Any]) -> dict[str, Any]:
        """``h`` without the family's ``PER_STEP`` values (they travel with the state): a
        compiled loop's constants, which would otherwise change at every step.  One dict
        per group (the tensors of a group share it, and so share a batched formula call)."""
        names = getattr(formulas.family(self.family), "PER_STEP", ())
        if not names:
            return h
        if self._per_step_cache[0] is not h:
            self._per_step_cache = (h, {k: v for k, v in h.items() if k not in names})
        return self._per_step_cache[1]

    def _group_step(self, index: int, pending: _Pending | None) -> registry.GroupStep:
        """What a registered model's ``scalars`` hook sees of group ``index``."""
        groups = self.optimizer.param_groups
        before = pending.groups[index] if pending is not None and pending.groups else None
        lrs = pending.lrs if pending is not None else [g["lr"] for g in groups]
        counter = self.registration.counter if self.registration is not None else None
        return registry.GroupStep(self.optimizer, index, groups[index], before, lrs,
                                  groups[index].get(counter) if counter else None)

    def view(self, state: dict[str, Any], p: torch.Tensor, h: dict[str, Any],
             recorded: dict[str, Any] | None, t: Any = None,
             theta: torch.Tensor | None = None) -> tuple[dict[str, Any], Any]:
        """The formula's inputs of ``p`` (the model's ``state`` hook applied) and its step
        counter as the formula takes it (``t``, else the state's); the family's
        ``STEP_SCALARS``, computed here once as the optimizer computes them, travel with
        the state (arguments of a compiled loop, not constants).  ``theta``: the tensor the
        step moved where it is not ``p`` (a schedule-free wrapper's z, ``_state``)."""
        view = state_view(state, p, recorded)
        if theta is not None and theta is not p:
            view["param"] = canonical(theta.detach())
        if self.registration is not None and self.registration.state is not None:
            view = self.registration.state(view, p, h)
        view, t = host_scalars(self.family, view, state.get("step", 0) if t is None else t, h)
        module = formulas.family(self.family)
        names = getattr(module, "STEP_SCALARS", ())
        if names:
            values = {**h, **module.step_sizes(np, t, h, "torch")}
            view.update({name: values[name] for name in names})
        return view, t

    def _per_chunk(self, state: dict[str, Any], p: torch.Tensor, h: dict[str, Any],
                   recorded: dict[str, Any] | None, counter: Any = None,
                   theta: torch.Tensor | None = None) -> Callable[[slice], Elementwise]:
        """The Elementwise of a flat chunk of ``p``, computed chunk by chunk where possible."""
        by_group = self.registration is not None and self.registration.counter is not None
        view, t = self.view(state, p, h, recorded, counter if by_group else None, theta)
        h = self._formula_hyperparameters(h)
        if formulas.chunkable(self.family):
            return fused.ChunkedFormula(apply_formula, self.family, view, t, h, p.dtype)
        whole = apply_formula(self.family, view, t, h, p.dtype)

        def flat(value: Any, chunk: slice) -> Any:
            return value.reshape(-1)[chunk] if isinstance(value, torch.Tensor) and value.dim() else value

        return lambda chunk: Elementwise(flat(whole.eta, chunk), flat(whole.direction, chunk),
                                         whole.decay_rate, flat(whole.eps_dominated, chunk),
                                         flat(whole.delta, chunk))

    def _base_group(self, group: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """``group`` as the base optimizer's model reads it, and the options of a schedule-free
        wrapper lrscope does not model (``group`` itself and none without a wrapper)."""
        if self.wrapped is None:
            return group, []
        return self.wrapped.group(group), self.wrapped.unsupported()

    def _wrapper_scalars(self, index: int, after: dict[str, Any], lr: Any, pending: _Pending | None,
                         notes: list[str]) -> dict[str, float]:
        """A schedule-free wrapper's scalars of group ``index``: as the post-hook recorded
        them (``end``), else, without a hook (``inspect``), from what its step left."""
        if pending is None:
            return self.wrapped.scalars(after, lr, stepping=False)
        if pending.wrapper_scalars is None:
            notes.append(f"group {group_name(after, index)}: the wrapper's averaging keys could not be "
                         "read at the step: ckp1 unknown")
            return {"ckp1": math.nan}
        return pending.wrapper_scalars[index]

    def _state(self, p: torch.Tensor, stepping: bool) -> tuple[dict[str, Any], torch.Tensor]:
        """``p``'s state as its optimizer's model reads it, and the tensor its step moved:
        ``p``, or a schedule-free wrapper's z (``stepping``: read inside the step)."""
        state = self.optimizer.state.get(p, {})
        if self.wrapped is None:
            return state, p
        return self.wrapped.state(state), self.wrapped.z(p, state, stepping)

    def _counter(self, params: list[torch.Tensor], index: int) -> Any:
        """Step counter of the group's first parameter that moved this step, as the state
        holds it (a device tensor is not read here), or the group's where the model says
        the optimizer counts steps per group; None if none."""
        if self.registration is not None and self.registration.counter is not None:
            return self.optimizer.param_groups[index].get(self.registration.counter)
        for p in params:
            if p.grad is not None:
                state = self.optimizer.state.get(p)
                return state["step"] if state and "step" in state else None
        return None

    def _step_count(self) -> int:
        """The largest step counter of the groups (0 when the state keeps none, as SGD's);
        a host read for counters on a device."""
        counters = [self._counter(g["params"], i) for i, g in enumerate(self.optimizer.param_groups)]
        return max((int(as_float(c)) for c in counters if c is not None), default=0)

    def _decay_rate(self, h: dict[str, Any], step_size: float) -> float:
        """Fraction of theta removed by decoupled decay this step (coupled L2 lives in d)."""
        module = formulas.family(self.family)
        if hasattr(module, "decay_rate"):
            return as_float(module.decay_rate(h, step_size))
        if self.family == "asgd":
            return h["lambd"] * step_size  # theta *= 1 - lambd * eta_t
        decoupled = h.get("decoupled_weight_decay", False) or self.family == "adafactor"
        if decoupled and h.get("weight_decay"):
            return as_float(h["lr"]) * float(h["weight_decay"])
        return 0.0

    def _param_reports(self, part: _GroupParts, host: dict[str, Any]) -> dict[str, ParamReport]:
        reports = {}
        tensors = ([(f.name or self.name_of(f.param), f.shape, f.counted) for f in part.fragments]
                   if part.fragments is not None else
                   [(self.name_of(p), tuple(p.shape), self.membership is None or self.membership.counts(p))
                    for p in part.params])
        for name, shape, counted in tensors:
            report = ParamReport(name=name, shape=shape)
            if self.membership is not None and not self.merging:
                report.replica = not counted
            if name in host:
                dist, update_norm, param_norm = host[name]
                setattr(report, part.label, dist)
                report.update_norm, report.param_norm = update_norm, param_norm
            reports[name] = report
        return reports
