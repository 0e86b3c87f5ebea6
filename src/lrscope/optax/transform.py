"""Optax backend: a GradientTransformation whose state carries the step's statistics.

Like optax's own ``transforms/_monitoring.py``, the measurements live in the optimizer
state, so everything runs inside ``jit`` (and under ``pjit``/sharding) without host
callbacks: ``monitor(optax.adamw, learning_rate=..., weight_decay=...)`` returns a
transformation whose updates are exactly those of ``optax.adamw(...)`` and whose
``LrscopeState`` holds, for the step just taken, the lr it used, the step size, the
decay rate (every step) and per tensor the float32 bit-bucket counts of eta, its exact
finite min/max/sum/sum of squares, the eps-dominated count, the update and parameter
squared norms and a model check (every ``every`` steps, under ``jax.lax.cond``).
``inspect(opt_state)`` moves those few arrays to the host in one transfer and builds
the StepReport.

A group is reported measured-only (the statistics of the realized update, as in
empirical mode) where lrscope cannot model it: a state it does not know in the group
(``model.find_groups``, decided at ``init``), or a model check that refutes the model
(decided inside ``jit`` on each step with distributions, ``measured_if_refuted``).
Every parameter tensor is in some group: those no modelled state covers form a
measured-only group of their own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lrscope import formulas
from lrscope._warnings import warn
from lrscope.optax import model as optax_model
from lrscope.jax.compact import carried, carried_empty, compiled_carried
from lrscope.jax.stats import (
    LeafStats, by_blocks, compiled_leaf_stats, compiled_or_blocks, leaf_stats, measured_if_refuted,
    merge_stats, stack_stats, stat_dtype,
)
from lrscope.monitor import checked_every

#: Relative mismatch between the modelled and the real update above which lrscope's
#: model does not describe this optimizer and the group is reported measured-only
#: (float32 rounding is ~1e-6); raised to 8 machine epsilons for half-precision parameters.
MODEL_TOLERANCE = 1e-3
#: The group of the tensors that no group's state covers and no stateless group can take.
UNCOVERED = "unmodelled"


@dataclass(frozen=True)
class GroupPlan:
    """Static description of a group: what is modelled and which leaves it holds."""

    name: str
    family: str | None
    empirical: bool  # measured-only by its structure (a check may also refute a modelled one)
    leaves: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    leaf_index: tuple[int, ...]
    decayed: tuple[bool, ...]
    scalar_names: tuple[str, ...]
    notes: tuple[str, ...]
    tolerance: float  # for model_error, see MODEL_TOLERANCE


@dataclass(frozen=True)
class Plan:
    """Static part of the state (a pytree node without leaves, so jit keeps it as is)."""

    optimizer: str
    every: int
    keep_arrays: bool
    check: bool
    per_param: bool
    groups: tuple[GroupPlan, ...]

    def stats_count(self, group: GroupPlan) -> int:
        """Number of LeafStats a group keeps: one per tensor, or one for the group."""
        return len(group.leaves) if self.per_param else 1


jax.tree_util.register_static(Plan)


class LrscopeState(NamedTuple):
    """State of ``lrscope.optax.monitor``: the inner optimizer's state plus statistics."""

    inner: Any
    plan: Plan
    steps: jax.Array
    scalars: dict[str, dict[str, jax.Array]]
    stats: dict[str, LeafStats]  # stacked, a row per tensor (or one row per group); buckets:
    # their nonzero ones only (lrscope.jax.compact.Counts)
    stats_step: jax.Array
    arrays: dict[str, tuple[dict[str, jax.Array], ...]]


GroupModel = optax_model.GroupModel


def _hyper(model: GroupModel, nodes: list[Any], steps: jax.Array,
           old_nodes: list[Any] | None = None) -> dict[str, Any]:
    """The group's hyperparameters for the step just taken, ``lr`` included.

    The lr is the schedule at the count before the step (as optax evaluates it), the
    given float, or NaN when unknown; values an ``inject_hyperparams`` state holds (the
    ones the step used) replace them; values that change every step (Prodigy's ``d``,
    schedule-free's ``ckp1``) come from the state before (``old_nodes``) and after it.
    """
    h = dict(model.h)
    if model.family is not None:
        own = [n for n in nodes if not isinstance(n, optax_model.INJECT)]
        before = own if old_nodes is None else [
            n for n in old_nodes if not isinstance(n, optax_model.INJECT)]
        h.update(optax_model.step_hyper(before, own, h))
    if callable(model.lr):
        h["lr"] = model.lr(steps)
    elif model.family_name != "rprop":  # rprop's lr is its initial step size, already in h
        h["lr"] = jnp.nan if model.lr is None else model.lr
    inject = next((n for n in nodes if isinstance(n, optax_model.INJECT)), None)
    for name, optax_name in model.injected:
        h[name] = inject.hyperparams[optax_name]
    h["lr"] = jnp.asarray(h.get("lr", jnp.nan), stat_dtype())
    return h


def _scalars(model: GroupModel | None, nodes: list[Any], steps: jax.Array,
             old_nodes: list[Any] | None = None) -> dict[str, jax.Array]:
    """lr, the family's step sizes and the decoupled weight-decay rate of the step after
    ``steps`` steps: O(1) per step.  A measured-only group has its lr only, a group
    without a model (tensors no state covers) not even that: NaN.
    """
    f = stat_dtype()
    if model is None:
        return {"lr": jnp.asarray(jnp.nan, f)}
    h = _hyper(model, nodes, steps, old_nodes)
    t = steps + 1
    out = {"lr": h["lr"]}
    if model.family is not None:
        sizes = model.family.step_sizes(jnp, t, h, "optax")
        out.update({k: jnp.asarray(v, f) for k, v in sizes.items()})
        scale = {"lr": h["lr"], "wd": 1.0, "none": 0.0,
                 "step_size": sizes["step_size"]}[model.decay_scale]
        out["weight_decay_rate"] = jnp.asarray(scale * h.get("weight_decay", 0.0), f)
    return out


def _models(inner: Any, spec: dict[str, Any]) -> tuple[dict[str, GroupModel], dict[str, list[Any]]]:
    """The group models of a state by group name, and each group's state nodes."""
    nodes = optax_model.find_groups(inner)
    return {m.name: m for m in optax_model.build_groups(nodes, spec)}, nodes


def _plan(spec: dict[str, Any], inner: Any, params: Any, every: int, keep_arrays: bool,
          check: bool, per_param: bool) -> Plan:
    """The static Plan: groups, their tensors (names, shapes, decay mask), scalar names.

    A modelled group holds the tensors its state covers (masked ones are MaskedNode), or
    without state (an alias's SGD) every tensor no other group holds; a measured-only
    group the tensors its state keeps something for (``model.held_leaves``).  The tensors
    left over go to the measured-only groups that hold none (a ``set_to_zero`` label;
    their names joined by "+"), else to a group ``UNCOVERED``: none is left out.
    """
    models, nodes = _models(inner, spec)
    names, flat = optax_model.leaf_names(params), optax_model.leaves(params)
    common_mask = spec["kwargs"].get("mask", spec["kwargs"].get("weight_decay_mask"))
    groups, claimed, holding_none = [], set(), []

    def add(name: str, model: GroupModel | None, index: tuple[int, ...], notes: list[str]) -> None:
        claimed.update(index)
        mask = spec.get("masks", {}).get(name, common_mask)  # muon's: its matrices' only
        if callable(mask):
            mask = mask(params)
        decay_mask = None if mask is None else optax_model.leaves(mask)
        decayed = tuple(bool(decay_mask[i]) if decay_mask else True for i in index)
        scalars = _scalars(model, nodes.get(name, []), jnp.zeros([], jnp.int32))
        groups.append(GroupPlan(
            name, None if model is None else model.family_name, model is None or model.family is None,
            tuple(names[i] for i in index), tuple(tuple(np.shape(flat[i])) for i in index), index,
            decayed, tuple(scalars), tuple(notes), _tolerance([flat[i] for i in index])))

    for model in models.values():
        own = [n for n in nodes[model.name] if not isinstance(n, optax_model.INJECT)]
        if model.family is None:
            index = optax_model.held_leaves(own, params)
        elif own:
            first = next(iter(optax_model.readers_for(model)[0](own[0], own[0]).values()))
            index = tuple(i for i, x in enumerate(optax_model.leaves(first))
                          if not optax_model.is_masked(x))
        else:
            index = tuple(range(len(flat)))
        index = tuple(i for i in index if i not in claimed)
        if model.family is None and not index:
            holding_none.append(model)
        else:
            unchecked = [] if check or spec["alias"] is not None or model.family is None else [
                f"group {model.name}: the model check is off (check=False): the stateless "
                "transformations of this chain (EmptyState) are invisible in its state and "
                f"assumed to be those of {model.family_name}; nothing verifies eta"]
            add(model.name, model, index, model.notes + unchecked)
    rest = tuple(i for i in range(len(flat)) if i not in claimed)
    if rest and len(holding_none) == 1:
        add(holding_none[0].name, holding_none[0], rest, holding_none[0].notes)
    elif rest:
        name = "+".join(m.name for m in holding_none) or UNCOVERED
        notes = [n for m in holding_none for n in m.notes] or [
            f"group {name}: no optimizer state lrscope reads covers "
            f"{', '.join(names[i] for i in rest)}: {optax_model.MEASURED}"]
        add(name, None, rest, notes)
    return Plan(spec["name"], every, keep_arrays, check, per_param, tuple(groups))


def _tolerance(tensors: list[Any]) -> float:
    """MODEL_TOLERANCE, or 8 epsilons of the least precise floating dtype among ``tensors``."""
    eps = [float(jnp.finfo(x.dtype).eps) for x in tensors
           if jnp.issubdtype(x.dtype, jnp.inexact)]
    return max([MODEL_TOLERANCE] + [8 * e for e in eps])


def _spec(optimizer: Any, family: str | None, groups: dict[str, dict[str, Any]],
          kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The transformation to wrap and what is known about it."""
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer, {"alias": None, "name": "chain", "family": family, "kwargs": kwargs,
                           "groups": groups}
    if groups:
        raise TypeError("groups= describes the multi_transform groups of a transformation you "
                        "built; pass the alias's hyperparameters directly")
    if not callable(optimizer):
        raise TypeError("monitor() takes an optax alias (optax.adamw) or a "
                        f"GradientTransformation, got {type(optimizer).__name__}")
    tx = optimizer(**kwargs)
    try:
        known = optimizer in optax_model.ALIASES
    except TypeError:  # an unhashable callable
        known = False
    if not known:  # e.g. optax.inject_hyperparams(optax.adamw): read it as a chain
        name = getattr(optimizer, "__name__", "chain")
        return tx, {"alias": None, "name": name, "family": family, "kwargs": kwargs,
                    "groups": {}}
    name, fam, h, lr, notes = optax_model.from_alias(optimizer, kwargs)
    spec = {"alias": optimizer, "name": name, "family": fam, "h": h, "lr": lr,
            "notes": notes, "kwargs": kwargs}
    if optimizer is optax.contrib.muon:
        spec["per_group"], spec["masks"] = optax_model.muon_groups(kwargs)
    return tx, spec


def _kept_arrays(plan: Plan, params: Any) -> dict[str, tuple[dict[str, jax.Array], ...]]:
    """Zero eta/d/decay arrays for ``keep_arrays`` (the state's shape before any step)."""
    if not plan.keep_arrays:
        return {}
    flat, f = optax_model.leaves(params), stat_dtype()
    return {g.name: tuple({"eta": jnp.zeros(np.shape(flat[i]), f),
                           "direction": jnp.zeros(np.shape(flat[i]), jnp.result_type(flat[i], f)),
                           "decay_rate": jnp.zeros((), f)} for i in g.leaf_index)
            for g in plan.groups if not g.empirical}


def _distributions(spec: dict[str, Any], plan: Plan, old_inner: Any, inner: Any, grads: Any,
                   updates: Any, after: Any,
                   steps: jax.Array) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-tensor statistics of every group (and eta/d/decay arrays with ``keep_arrays``).

    ``updates`` is the update optax emitted (None when not needed, see ``_needs_real``)
    and ``after`` theta after the step (None when update() got no params).  A
    measured-only group sketches |updates|; a modelled one eta, or |updates| where the
    model check (``plan.check``) refutes its model.
    """
    models, new_nodes = _models(inner, spec)
    old_nodes = _models(old_inner, spec)[1]
    grads_tree, grads = grads, optax_model.leaves(grads)
    reals = optax_model.leaves(updates) if updates is not None else [None] * len(grads)
    afters = optax_model.leaves(after) if after is not None else [None] * len(grads)
    stats, arrays = {}, {}
    for group in plan.groups:
        if not group.leaf_index:
            stats[group.name] = carried_empty(plan.stats_count(group))
            continue
        sizes = [int(np.size(grads[i])) for i in group.leaf_index]
        realized = [lambda i=i: leaf_stats(None, {}, steps + 1, {}, grads[i], reals[i], afters[i],
                                           check=True)[0] for i in group.leaf_index]
        if group.empirical:
            stacked = by_blocks(realized, sizes)
            stats[group.name] = carried(stacked if plan.per_param else merge_stats(stacked))
            continue
        model = models[group.name]
        h = _hyper(model, new_nodes.get(model.name, []), steps, old_nodes.get(model.name, []))
        pairs = [(old, new) for old, new in zip(old_nodes.get(model.name, []),
                                                new_nodes.get(model.name, []))
                 if not isinstance(new, optax_model.INJECT)]
        named: dict[str, list[Any]] = {}
        for read, (old, new) in zip(optax_model.readers_for(model), pairs):
            for key, tree in read(old, new).items():
                named[key] = optax_model.leaves(tree)
        numbers = (optax_model.muon_dimension_numbers(h["dimension_numbers"], grads_tree)
                   if model.family_name == "muon" else None)

        def arrays_of(i: int, hyper: dict[str, Any]) -> dict[str, Any]:
            """Leaf i's state arrays (and Muon's O, computed where the leaf is measured)."""
            arrays = {key: v[i] for key, v in named.items()}
            if numbers is not None:
                arrays.update(optax_model.muon_arrays(hyper, arrays, grads[i], steps + 1,
                                                      numbers[i]))
            return arrays

        def hyper_of(decayed: bool) -> dict[str, Any]:
            """The group's hyperparameters for a tensor with or without weight decay."""
            return h if decayed else {**h, "weight_decay": 0.0}

        def measure(i: int, decayed: bool) -> tuple[LeafStats, dict[str, Any]]:
            hyper = hyper_of(decayed)
            return leaf_stats(model.family, arrays_of(i, hyper), steps + 1, hyper, grads[i],
                              reals[i], afters[i], check=plan.check)

        def compiled(i: int, decayed: bool, keep: int | None) -> LeafStats:
            """Or fused.Unsupported."""
            hyper = hyper_of(decayed)
            return compiled_leaf_stats(model.family, arrays_of(i, hyper), steps + 1, hyper,
                                       grads[i], reals[i], afters[i], keep=keep)

        pairs = list(zip(group.leaf_index, group.decayed))
        measures = [functools.partial(measure, i, decayed) for i, decayed in pairs]
        traced = [lambda m=m: m()[0] for m in measures]
        passes = [functools.partial(compiled, i, decayed) for i, decayed in pairs]
        if not (plan.keep_arrays or plan.check) and plan.per_param:  # the usual case
            stats[group.name] = compiled_carried(passes, traced, sizes)
            continue
        if plan.keep_arrays:  # arrays of every shape: no loop
            rows, arrays[group.name] = zip(*(measure() for measure in measures))
            stacked = stack_stats(list(rows))
        elif plan.check:  # the check compares the model with the real update: XLA
            stacked = by_blocks(traced, sizes)
        else:
            stacked = compiled_or_blocks(passes, traced, sizes)
        if plan.check:
            stacked = measured_if_refuted(stacked, lambda: by_blocks(realized, sizes), group.tolerance)
        stats[group.name] = carried(stacked if plan.per_param else merge_stats(stacked))
    return stats, arrays


def _needs_real(plan: Plan, has_params: bool) -> bool:
    """Whether the statistics read the real update: to check the model against it, to
    sketch it (empirical groups), or to recover theta before the step for a family whose
    eta or d reads it.  Otherwise the update never has to exist in memory apart from the
    caller's apply_updates (the cheapest steps between distributions)."""
    return plan.check or any(
        g.empirical or (has_params and getattr(formulas.family(g.family), "READS_PARAM_BEFORE", False))
        for g in plan.groups)


def monitor(optimizer: Any, /, *, every: int = 1, check: bool | None = None, per_param: bool = True,
            keep_arrays: bool = False, family: str | None = None,
            groups: dict[str, dict[str, Any]] | None = None,
            **hyperparams: Any) -> optax.GradientTransformationExtraArgs:
    """``optimizer`` (an optax alias, or a transformation) whose state carries lrscope's statistics.

    * ``monitor(optax.adamw, learning_rate=schedule, weight_decay=1e-2)``: the alias is
      called with ``hyperparams``; its family and every hyperparameter (defaults from
      the alias's signature) are known, so eta is modelled exactly.
    * ``monitor(tx)`` on a transformation you built (``optax.chain(...)``,
      ``inject_hyperparams``, ``masked``, ``multi_transform``): the optimizer is found by
      the type of its state (``ScaleByAdamState``, ...), one report group per
      ``multi_transform`` label; the lr comes from ``inject_hyperparams`` or from
      ``learning_rate=``; other hyperparameters (``b1``, ``b2``, ``eps``, ...; optax
      names) may be passed and are otherwise assumed at optax's defaults, which the
      report's notes say.  ``family="nadam"`` picks a family the state cannot tell;
      ``groups={"head": {"learning_rate": 1e-2, "momentum": 0.9}}`` gives one
      ``multi_transform`` label its own hyperparameters (over the common ones).

    Every step the state records ``t``, the lr the step used (schedules are evaluated
    at ``count - 1``, as optax does), the step size and the weight-decay rate; every
    ``every`` steps (``jax.lax.cond``) the per-tensor eta distribution, the
    eps-dominated count, the update and parameter norms and ``model_error``, the
    relative mismatch between lrscope's ``-eta * d - decay * theta`` and the real
    update (a built-in check that the model describes this optimizer; above its
    tolerance the group is reported measured-only, see below).  By default
    (``check=None``) the check runs for transformations you built, whose model rests on
    assumed hyperparameters and on the stateless transformations in it (``EmptyState``:
    only the check sees what they do), and not for aliases, whose model is exact:
    without it the real update need not be kept for the statistics (the norms come
    from the model), which makes the steps between distributions nearly free.
    ``check=True`` or ``False`` forces it.  The state keeps each tensor's nonzero bucket
    counts (room for 1024 per tensor, 8 KiB, and for 32768 more per group, 256 KiB:
    ``lrscope.jax.compact``); ``per_param=False`` keeps one set per group instead (group
    distributions only, no per-tensor ones), for models with very many tensors.
    ``keep_arrays=True`` also keeps eta and d per tensor in the state (for debugging
    and tests: two more copies of the parameters).

    A group lrscope cannot model is reported *measured-only*: the distribution of
    |delta theta| (``update_magnitude``), the update and parameter norms of the real
    update, the lr it was given, step size and decay rate NaN, with one warning and a
    note.  That is the case for options it does not model (a non-default
    ``bias_correction_nu``, an alias without a formula), for a group holding a state
    lrscope does not know, even around or beside one it does (a custom
    transformation's; ``schedule_free(...)``'s ``ScheduleFreeState`` and ``MuonState``
    in a transformation you built: their aliases ``optax.contrib.schedule_free_adamw``,
    ``schedule_free_sgd`` and ``muon`` are modelled), and on the steps whose model
    check fails.  Every tensor is in the report: those no state
    lrscope models covers (a ``masked`` chain's others, a ``set_to_zero`` label) form a
    measured-only group.  See ``lrscope.optax`` for an example.
    """
    every = checked_every(every)
    tx, spec = _spec(optimizer, family, dict(groups or {}), hyperparams)
    tx = optax.with_extra_args_support(tx)
    if check is None:
        # An alias's model is exact (every hyperparameter known, proven by the tests): no
        # need to keep its real update around.  A chain's rests on assumptions: check it.
        check = spec["alias"] is None

    def init_fn(params: Any) -> LrscopeState:
        inner = tx.init(params)
        plan = _plan(spec, inner, params, every, keep_arrays, check, per_param)
        for group in plan.groups:
            if group.empirical:
                warn("lrscope: " + " ".join(group.notes))
        models, nodes = _models(inner, spec)
        steps = jnp.zeros([], jnp.int32)
        scalars = {g.name: _scalars(models.get(g.name), nodes.get(g.name, []), steps)
                   for g in plan.groups}
        stats = {g.name: carried_empty(plan.stats_count(g)) for g in plan.groups}
        # One buffer per leaf (carried_empty repeats its NaN array, and a step size may be the lr
        # itself): a training loop may donate the state, and XLA refuses a buffer donated twice.
        distinct = jax.tree_util.tree_map(
            jnp.array, (steps, scalars, stats, steps, _kept_arrays(plan, params)))
        return LrscopeState(inner, plan, *distinct)

    def update_fn(updates: Any, state: LrscopeState, params: Any = None,
                  **extra: Any) -> tuple[Any, LrscopeState]:
        new_updates, inner = tx.update(updates, state.inner, params, **extra)
        plan, steps = state.plan, state.steps
        models, nodes = _models(inner, spec)
        old_nodes = _models(state.inner, spec)[1]
        scalars = {g.name: _scalars(models.get(g.name), nodes.get(g.name, []), steps,
                                    old_nodes.get(g.name, [])) for g in plan.groups}
        # The statistics read theta after the step, the caller's own apply_updates (XLA
        # computes the same expression once), never ``params``: a training loop may donate
        # params, and XLA then copies every parameter on every step if anything else
        # reads them.  Theta before the step comes from the real update where one is
        # needed anyway, otherwise from the model (lrscope.jax.stats.leaf_stats).
        after = None if params is None else optax.apply_updates(params, new_updates)
        real = new_updates if _needs_real(plan, params is not None) else None
        arrays = (state.inner, inner, updates, real, after, steps)
        if plan.every == 1:
            (stats, kept), stats_step = _distributions(spec, plan, *arrays), steps + 1
        else:
            # Distributions on steps 1, 1 + every, ...; other steps keep the last ones.
            due = steps % plan.every == 0
            stats, kept = jax.lax.cond(due, lambda ops: _distributions(spec, plan, *ops[0]),
                                       lambda ops: ops[1], (arrays, (state.stats, state.arrays)))
            stats_step = jnp.where(due, steps + 1, state.stats_step)
        return new_updates, LrscopeState(inner, plan, steps + 1, scalars, stats, stats_step, kept)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# -- reading the state on the host --------------------------------------------------------
