"""How lrscope reads an Optax optimizer: aliases, state nodes, hyperparameters, groups.

Two ways in, one result (a list of ``GroupModel``):

* an alias and its arguments (``optax.adamw, learning_rate=..., weight_decay=...``): the
  family and every hyperparameter are known (defaults from the alias's own signature);
* a transformation the user built: the family is found by the *type* of the state
  nodes in its state (``ScaleByAdamState``, ``ScaleByRssState``, ...), the learning rate
  from an ``inject_hyperparams`` state or the ``learning_rate=`` given to ``monitor``, and
  any other hyperparameter not given is assumed at the formula's Optax default, which
  the report says (and the in-``jit`` model check verifies against the real update).

A group is modelled only when every state in it is one lrscope reads (``_READERS``), a
container it looks through (chain, ``masked``, ``inject_hyperparams``) or a NEUTRAL one:
a state it recognises inside or beside a transformation it does not know (a custom
one) makes the group measured-only (the statistics of the realized update), never
modelled by the part it recognises.  ``optax.contrib``'s Prodigy is read like Adam;
schedule-free and Muon are modelled through their aliases only (``schedule_free_adamw``,
``schedule_free_sgd``, ``muon``), whose arguments say what their base optimizer and
dimension numbers are: built by hand (``schedule_free(any_optimizer)``) they are
measured-only (``ALIAS_ONLY``).

A state node's arrays are renamed to PyTorch's state names (``mu`` -> ``exp_avg``, ...)
for the family formulas in ``lrscope.formulas``.

(Over 500 lines: the two ways in share the translation tables, ``GroupModel`` and the
state readers, and the contrib optimizers — Prodigy, schedule-free, Muon — each need both.)
"""

from __future__ import annotations

import inspect as pyinspect
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

import jax
import numpy as np
import optax
from optax._src import transform as _T  # the WithCount states are not re-exported

from lrscope import formulas
from lrscope.formulas._common import resolve

#: Alias -> family whose formula models it (identity lookup on the real functions).
ALIASES: dict[Any, str] = {
    optax.adam: "adam", optax.adamw: "adamw", optax.nadam: "adam", optax.nadamw: "adamw",
    optax.amsgrad: "amsgrad", optax.radam: "radam", optax.adamax: "adamax",
    optax.adamaxw: "adamax", optax.adagrad: "adagrad", optax.rmsprop: "rmsprop",
    optax.sgd: "sgd", optax.lion: "lion", optax.adabelief: "adabelief", optax.yogi: "yogi",
    optax.adadelta: "adadelta", optax.rprop: "rprop", optax.lamb: "lamb",
    optax.adafactor: "adafactor", optax.contrib.prodigy: "prodigy",
    optax.contrib.schedule_free_adamw: "schedule_free",
    optax.contrib.schedule_free_sgd: "schedule_free", optax.contrib.muon: "muon",
}
#: Families whose optax per-element model tests/test_optax.py checks against the real
#: optimizer; any other is reported empirically rather than trusted unchecked.
VERIFIED = {"adam", "adamw", "nadam", "amsgrad", "radam", "adamax", "adagrad", "rmsprop", "sgd",
            "lion", "adabelief", "yogi", "adadelta", "rprop", "adafactor", "lamb", "prodigy",
            "schedule_free", "muon"}
#: Families lrscope models through their optax.contrib alias only (its arguments say what
#: the state cannot: the base optimizer, the dimension numbers), with the alias to use.
ALIAS_ONLY = {"schedule_free": "optax.contrib.schedule_free_adamw or schedule_free_sgd",
              "muon": "optax.contrib.muon"}
#: Optax argument names that differ from the formulas' names.
_RENAME = {"learning_rate": "lr", "b1": "beta1", "b2": "beta2", "weight_decay_mask": "mask",
           "weight_decay_rate": "weight_decay"}
#: Arguments that change storage, not arithmetic.
_NEUTRAL = {"mu_dtype", "accumulator_dtype", "dtype_momentum"}
#: Hyperparameters an inject_hyperparams state may provide as traced values (the formulas
#: only use them in arithmetic, never in Python conditions).
_TRACEABLE = {"lr", "beta1", "beta2", "eps", "eps_root"}
#: Why an injected hyperparameter outside those is not read from the state.
_UNREAD = ("lrscope reads only lr, b1, b2, eps, eps_root and, for some families, the weight "
           "decay from an inject_hyperparams state, as traced values its formulas use in "
           "arithmetic only")
#: Families whose optax formula also uses the weight decay in arithmetic only, so that an
#: injected one is read too (``inject_hyperparams(optax.adamw)`` injects it).
_TRACEABLE_DECAY = {"adam", "adamw", "nadam", "amsgrad", "adamax", "lion", "lamb", "prodigy"}
#: Internal switches of the formulas and values read from the state each step, not optax
#: hyperparameters; and Prodigy's options that change its estimate d (read from the
#: state), not the step given d: none of them is "assumed".
_FLAGS = {"lr", "amsgrad", "decoupled_weight_decay", "d", "d_next", "decouple",
          "use_bias_correction", "beta3", "estim_lr0", "estim_lr_coef", "safeguard_warmup"}
#: How the fraction of theta removed per step relates to the weight decay: "lr" (lr * wd,
#: the default), "none" (coupled decay, part of d: optax adds wd * theta to the gradient
#: before adadelta's scaling; rprop has none) or "wd" (adafactor: not scaled by lr).
DECAY_SCALE = {"adadelta": "none", "rprop": "none", "adafactor": "wd", "prodigy": "step_size"}

# State node type -> (family it signals in a chain, reader(old, new, family) -> arrays).
_Reader = Callable[[Any, Any, str], dict[str, Any]]
_READERS: dict[type, tuple[str | None, _Reader]] = {
    optax.ScaleByAdamState: ("adam", lambda old, new, fam: {
        "exp_avg": new.mu, ("exp_inf" if fam == "adamax" else "exp_avg_sq"): new.nu}),
    optax.ScaleByAmsgradState: ("amsgrad", lambda old, new, fam: {
        "exp_avg": new.mu, "exp_avg_sq": new.nu, "max_exp_avg_sq": new.nu_max}),
    optax.ScaleByBeliefState: ("adabelief", lambda old, new, fam: {
        "exp_avg": new.mu, "exp_avg_var": new.nu}),
    optax.ScaleByLionState: ("lion", lambda old, new, fam: {
        "exp_avg": new.mu, "exp_avg_before": old.mu}),
    optax.ScaleByRssState: ("adagrad", lambda old, new, fam: {"sum": new.sum_of_squares}),
    optax.ScaleByRmsState: ("rmsprop", lambda old, new, fam: {"square_avg": new.nu}),
    _T.ScaleByRmsWithCountState: ("rmsprop", lambda old, new, fam: {"square_avg": new.nu}),
    optax.ScaleByRStdDevState: ("rmsprop", lambda old, new, fam: {
        "square_avg": new.nu, "grad_avg": new.mu}),
    _T.ScaleByRStdDevWithCountState: ("rmsprop", lambda old, new, fam: {
        "square_avg": new.nu, "grad_avg": new.mu}),
    optax.ScaleByAdaDeltaState: ("adadelta", lambda old, new, fam: {
        "square_avg": new.e_g, "acc_delta_before": old.e_x}),
    optax.ScaleByRpropState: ("rprop", lambda old, new, fam: {
        "step_size": old.step_sizes, "prev": old.prev_updates}),
    optax.TraceState: ("sgd", lambda old, new, fam: {"momentum_buffer": new.trace}),
    optax.FactoredState: ("adafactor", lambda old, new, fam: {
        "row_var": new.v_row, "col_var": new.v_col, "variance": new.v}),
    optax.EmaState: (None, lambda old, new, fam: {"momentum_buffer": new.ema}),
    optax.contrib.ProdigyState: ("prodigy", lambda old, new, fam: {
        "exp_avg": new.exp_avg, "exp_avg_sq": new.exp_avg_sq}),
    optax.contrib.ScheduleFreeState: ("schedule_free", lambda old, new, fam: {
        "z": new.z, "z_before": old.z, **_rms_of(new.base_optimizer_state)}),
    optax.contrib.MuonState: ("muon", lambda old, new, fam: {"momentum_buffer": new.mu}),
}
#: State node type -> function(old, new, h) giving the hyperparameters that change every
#: step, read from the state (traced): Prodigy's estimate before and after the step,
#: schedule-free's averaging weight (as optax computes it) and the lr it used, Muon's
#: Newton-Schulz coefficients.
_Step = Callable[[Any, Any, dict[str, Any]], dict[str, Any]]
_STEP_HYPER: dict[type, _Step] = {
    optax.contrib.ProdigyState: lambda old, new, h: {"d": old.estim_lr, "d_next": new.estim_lr},
    optax.contrib.ScheduleFreeState: lambda old, new, h: {
        "ckp1": _schedule_free_weight(new, h["weight_lr_power"]), "max_lr": new.max_lr},
    optax.contrib.MuonState: lambda old, new, h: {"ns_coeffs": new.ns_coeffs},
}


def _rms_of(base_state: Any) -> dict[str, Any]:
    """The second moment of schedule_free_adamw's base optimizer (none for SGD)."""
    found = [n for n in jax.tree_util.tree_leaves(
        base_state, is_leaf=lambda x: isinstance(x, _T.ScaleByRmsWithCountState))
        if isinstance(n, _T.ScaleByRmsWithCountState)]
    return {"exp_avg_sq": found[0].nu} if found else {}


def _schedule_free_weight(new: Any, weight_lr_power: Any) -> Any:
    """``c_t`` of the step that produced ``new`` (a ScheduleFreeState), as optax computes it
    (its ``weight_sum`` is the new total)."""
    weight = new.max_lr ** weight_lr_power
    total = new.weight_sum
    return jax.numpy.where(jax.numpy.isnan(weight) | jax.numpy.isnan(total),
                           jax.numpy.full(weight.shape, jax.numpy.nan),
                           jax.numpy.nan_to_num(weight / total, nan=0.0, posinf=jax.numpy.inf))


def step_hyper(old_nodes: list[Any], new_nodes: list[Any], h: dict[str, Any]) -> dict[str, Any]:
    """The per-step hyperparameters the group's state nodes hold (``_STEP_HYPER``)."""
    out: dict[str, Any] = {}
    for old, new in zip(old_nodes, new_nodes):
        if type(new) in _STEP_HYPER:
            out.update(_STEP_HYPER[type(new)](old, new, h))
    return out
INJECT = (optax.InjectStatefulHyperparamsState, optax.InjectHyperparamsState)
#: States that hold nothing the models read and whose transformation changes the update
#: only as the model assumes (which the model check verifies where it runs): those of
#: stateless transformations (``scale``, ``clip``, ``add_decayed_weights``,
#: ``scale_by_trust_ratio``: ``EmptyState``) and a schedule's step counter (the lr, which
#: lrscope takes from the schedule it is given).  Matched by exact type, like the readers.
NEUTRAL = (optax.EmptyState, optax.ScaleByScheduleState)
#: What a group lrscope does not model reports, said in its notes.
MEASURED = "measured-only (the statistics of the realized update, as in empirical mode)"


def is_masked(x: Any) -> bool:
    """A placeholder for a tensor a masked or partitioned optimizer does not touch."""
    return isinstance(x, optax.MaskedNode) or x is None


def leaves(tree: Any) -> list[Any]:
    """Leaves of a params-shaped tree, keeping MaskedNode/None placeholders in place."""
    return jax.tree_util.tree_leaves(tree, is_leaf=is_masked)


def leaf_names(params: Any) -> list[str]:
    """``"dense/kernel"``-style names from the pytree paths of ``params``.

    >>> import jax.numpy as jnp
    >>> leaf_names({"dense": {"kernel": jnp.ones(2), "bias": jnp.ones(1)}, "layers": [jnp.ones(1)]})
    ['dense/bias', 'dense/kernel', 'layers/0']
    """
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_masked)[0]
    paths = [path for path, _ in flat]
    # nnx.Optimizer initialises with Variables (path ".../kernel/value") but updates with
    # plain arrays (".../kernel"): name both by the latter.
    paths = [p[:-1] if p and isinstance(p[-1], jax.tree_util.GetAttrKey) and p[-1].name == "value"
             else p for p in paths]
    return [jax.tree_util.keystr(p, simple=True, separator="/") or "param" for p in paths]


def find_groups(state: Any) -> dict[str, list[Any]]:
    """Each group's state nodes in tree order: the states lrscope reads, ``inject_hyperparams``
    states, and every state it does not know (not looked into: it is not modelled).

    Groups are the labels of a ``multi_transform`` (``PartitionState``), each one listed
    even where its transformation keeps no state, else ``pg0``.  Chains (tuples, lists,
    ``named_chain``'s dicts), ``masked`` and ``inject_hyperparams`` are looked through;
    NEUTRAL states are left out.

    >>> import jax.numpy as jnp
    >>> def types(tx):
    ...     groups = find_groups(tx.init({"w": jnp.ones((2, 2)), "b": jnp.ones(2)}))
    ...     return {label: [type(node).__name__ for node in nodes] for label, nodes in groups.items()}
    >>> types(optax.chain(optax.clip(1.0), optax.adam(1e-3)))
    {'pg0': ['ScaleByAdamState']}
    >>> types(optax.named_chain(("adam", optax.scale_by_adam()), ("lr", optax.scale(-1e-3))))
    {'pg0': ['ScaleByAdamState']}
    >>> types(optax.contrib.schedule_free_adamw(1e-3))  # its RMS state is not looked at
    {'pg0': ['ScheduleFreeState']}
    >>> types(optax.contrib.muon(1e-3))  # a multi_transform: labels "muon" and "adam"
    {'muon': ['MuonState'], 'adam': ['ScaleByAdamState']}
    """
    groups: dict[str, list[Any]] = {}

    def visit(node: Any, group: str) -> None:
        if isinstance(node, optax.PartitionState):
            for label, sub in node.inner_states.items():
                groups.setdefault(str(label), [])
                visit(sub, str(label))
        elif type(node) in (tuple, list):  # a chain's, not a NamedTuple state
            for sub in node:
                visit(sub, group)
        elif isinstance(node, dict):  # named_chain's OrderedDict
            for sub in node.values():
                visit(sub, group)
        elif isinstance(node, optax.MaskedState):
            visit(node.inner_state, group)
        elif node is not None and type(node) not in NEUTRAL:
            groups.setdefault(group, []).append(node)
            if isinstance(node, INJECT):
                visit(node.inner_state, group)

    visit(state, "pg0")
    return groups or {"pg0": []}


def unknown_nodes(nodes: list[Any]) -> list[Any]:
    """The nodes of ``find_groups`` that lrscope neither reads nor looks through."""
    return [n for n in nodes if type(n) not in _READERS and not isinstance(n, INJECT)]


def held_leaves(nodes: list[Any], params: Any) -> tuple[int, ...]:
    """Indices of the ``params`` leaves that ``nodes`` keep state for: the positions,
    not MaskedNode, of every tree in them shaped like ``params`` (same structure, same
    shapes), looked for at any depth.

    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}  # leaves b, w
    >>> groups = find_groups(optax.contrib.muon(1e-3).init(params))
    >>> {label: held_leaves(nodes, params) for label, nodes in groups.items()}
    {'muon': (1,), 'adam': (0,)}
    """
    structure = jax.tree_util.tree_structure(params, is_leaf=is_masked)
    shapes = [np.shape(x) for x in leaves(params)]
    held: set[int] = set()

    def visit(node: Any) -> None:
        flat = leaves(node)
        if (jax.tree_util.tree_structure(node, is_leaf=is_masked) == structure
                and all(is_masked(x) or np.shape(x) == s for x, s in zip(flat, shapes))):
            held.update(i for i, x in enumerate(flat) if not is_masked(x))
            return
        children = jax.tree_util.tree_leaves(node, is_leaf=lambda x: x is not node)
        if not (len(children) == 1 and children[0] is node):  # not an array
            for child in children:
                visit(child)

    for node in nodes:
        visit(node)
    return tuple(sorted(held))


@dataclass
class GroupModel:
    """How to read one group: family formula, hyperparameters, lr source, state nodes."""

    name: str
    family: ModuleType | None  # None: not modelled, measured-only
    family_name: str | None
    h: dict[str, Any]
    lr: Any  # float, schedule(count) or None (unknown or injected)
    decay_scale: str  # see DECAY_SCALE
    node_types: tuple[type, ...]  # the state nodes holding this group's arrays
    injected: tuple[tuple[str, str], ...] = ()  # (formula name, optax name) from the state
    notes: list[str] = field(default_factory=list)


def _translate(args: dict[str, Any]) -> dict[str, Any]:
    """Optax argument names to the formulas' names, storage-only arguments dropped,
    ``betas`` (Prodigy's) split."""
    out = {_RENAME.get(k, k): v for k, v in args.items() if k not in _NEUTRAL}
    if "betas" in out and isinstance(out["betas"], (tuple, list)) and len(out["betas"]) == 2:
        out["beta1"], out["beta2"] = out.pop("betas")
    return out


def _family_hyper(family_name: str, args: dict[str, Any], defaults: dict[str, Any],
                  where: str) -> tuple[dict[str, Any] | None, list[str]]:
    """Resolve ``args`` against the family's optax defaults; (None, notes) if unsupported."""
    module = formulas.family(family_name)
    known = module.DEFAULTS["optax"]
    unmodelled = {k: v for k, v in args.items() if k not in known and k != "mask"
                  and not (k in defaults and _same(v, defaults[k]))}
    if unmodelled or any(callable(args.get(k)) for k in ("weight_decay", "beta1", "beta2", "eps")):
        what = (", ".join(f"{k}={v!r}" for k, v in unmodelled.items())
                or "a scheduled hyperparameter")
        return None, [f"lrscope does not model {where} with {what}: {MEASURED}"]
    given = {k: v for k, v in args.items() if k in known and k != "lr"}
    h = resolve(family_name, module.DEFAULTS, "optax", given)
    if family_name == "amsgrad":
        h["amsgrad"] = True
    return h, []


def _module(family_name: str) -> ModuleType | None:
    """The family's formula module, or None where lrscope has none (yet)."""
    try:
        return formulas.family(family_name)
    except ValueError:
        return None


def _same(a: Any, b: Any) -> bool:
    """``a == b`` for hyperparameter values (arrays and odd objects compare as different)."""
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - arrays and odd objects: treat as different
        return a is b


def from_alias(alias: Any, kwargs: dict[str, Any]) -> tuple[str, str | None, dict[str, Any] | None,
                                                             Any, list[str]]:
    """(optimizer name, family, hyperparameters, lr, notes) of ``alias(**kwargs)``."""
    name = getattr(alias, "__name__", "optax")
    family_name = ALIASES[alias]
    signature = pyinspect.signature(alias)
    defaults = {k: p.default for k, p in signature.parameters.items()
                if p.default is not pyinspect.Parameter.empty}
    if alias is optax.nadam or alias is optax.nadamw:
        name = "nadamw" if alias is optax.nadamw else "nadam"
    args = _translate({**defaults, **kwargs})
    defaults = _translate(defaults)
    notes: list[str] = []
    if family_name in ("adam", "adamw"):
        if "nesterov" in args:  # optax's nadam is adam(nesterov=True)
            family_name = "nadam" if args.pop("nesterov") else "adam"
        defaults.pop("nesterov", None)
    if family_name == "radam" and not args.get("nesterov"):
        args.pop("nesterov", None)
    for key in ("momentum", "weight_decay"):  # optax's None: no such transformation
        if key in args and args[key] is None:
            args[key] = 0.0
    lr = args.pop("lr", None)
    if family_name == "adadelta" and lr is None:
        lr = -1.0
        notes.append("optax.adadelta(learning_rate=None) applies no learning rate and no sign "
                     "flip: each step ASCENDS the loss (theta += ratio * g); lrscope reports "
                     "lr = -1 and negative effective learning rates")
    if family_name == "adafactor" and lr is None:
        lr = 1.0
        notes.append("optax.adafactor(learning_rate=None) applies no learning rate: the step "
                     "is the parameter scale alone; lrscope reports lr = 1")
    if family_name == "lamb":
        notes.append("optax.lamb scales each tensor's step, weight decay included, by its "
                     "trust ratio: weight_decay_rate is lr * weight_decay before that ratio "
                     "(eta and the update norms include it)")
    if family_name == "schedule_free":
        if args.get("warmup_steps") is not None:  # as the alias builds it
            lr = optax.warmup_constant_schedule(0, lr, args["warmup_steps"])
        args["adaptive"] = alias is optax.contrib.schedule_free_adamw
        notes.append(f"optax.contrib.{name}: the parameters hold y, the point the gradient is "
                     "taken at (evaluate at x = optax.contrib.schedule_free_eval_params("
                     "state.inner, params)); eta and d describe the z-sequence "
                     "(z - z_before = -eta * d - weight_decay_rate * y_before), lr is the "
                     "z-step's (the schedule at t - 1), ckp1 the averaging weight, max_lr "
                     "the lr that weight used (the schedule at t)")
        if args.get("state_dtype") is not None:
            return name, family_name, None, lr, [
                f"lrscope does not model optax.contrib.{name} with state_dtype="
                f"{args['state_dtype']!r} (z rounded to another dtype): {MEASURED}"]
    if family_name == "prodigy":
        notes.append("optax.contrib.prodigy: step_size is d * lr * bias correction as the step "
                     "applied it, d the estimate it used (ProdigyState.estim_lr before the "
                     "step), d_next the new one (already in this step's denominator)")
    if family_name == "rprop":
        notes.append("optax.rprop applies the update it computed on the previous step (one "
                     "step late; nothing moves at t = 1): eta is that previous step size")
    if family_name == "muon":
        h, more = _muon_hyper(args, kwargs)
        return name, family_name, h, lr, notes + more
    module = _module(family_name)
    if module is None or family_name not in VERIFIED:
        return name, family_name, None, lr, [
            f"lrscope has no per-element model of optax.{name} yet: {MEASURED}"]
    h, more = _family_hyper(family_name, args, defaults, f"optax.{name}")
    if h is not None and family_name == "rprop":
        h["lr"] = lr
    return name, family_name, h, lr, notes + more


#: optax.contrib.muon's arguments that are not the matrix formula's hyperparameters but
#: are read elsewhere: the Newton-Schulz coefficients (from MuonState), the decay mask and
#: dimension numbers (here), the Adam part's (``muon_groups``).
_MUON_READ = {"ns_coeffs", "mask", "muon_weight_dimension_numbers", "adam_b1", "adam_b2",
              "adam_eps_root", "adam_weight_decay", "adam_learning_rate"}


def _muon_hyper(args: dict[str, Any], kwargs: dict[str, Any]
                ) -> tuple[dict[str, Any] | None, list[str]]:
    """The hyperparameters of optax.contrib.muon's matrix part (label "muon"); None with a
    note for an option lrscope does not model (an argument it does not know, a scheduled
    hyperparameter, a momentum rounded to ``mu_dtype`` after the step used it)."""
    known = formulas.family("muon").DEFAULTS["optax"]
    unknown = [k for k in args if k not in known and k not in _MUON_READ]
    traced = [k for k in ("beta", "eps", "weight_decay", "consistent_rms") if callable(args.get(k))]
    if kwargs.get("mu_dtype") is not None or traced or unknown:
        what = ", ".join(
            [f"{k}={args[k]!r}" for k in unknown] + [f"a scheduled {k}" for k in traced]
            + ([f"mu_dtype={kwargs['mu_dtype']!r} (the momentum is rounded after the step "
                "used it)"] if kwargs.get("mu_dtype") is not None else []))
        return None, [f"group muon: lrscope does not model optax.contrib.muon with {what}: "
                      f"{MEASURED}"]
    h = resolve("muon", formulas.family("muon").DEFAULTS, "optax",
                {k: v for k, v in args.items() if k in known and k != "lr"})
    h["dimension_numbers"] = args.get("muon_weight_dimension_numbers")
    return h, ["optax.contrib.muon: group muon's eta is lr times the shape scale of each matrix "
               "(one value per tensor, from its global shape and dimension numbers), d the "
               "orthogonalized update, recomputed from the momentum with optax's Newton-Schulz "
               "function; group adam is optax.adamw(nesterov=nesterov): NAdamW by default"]


def muon_groups(kwargs: dict[str, Any]) -> tuple[dict[str, tuple[Any, ...]], dict[str, Any]]:
    """optax.contrib.muon(**kwargs)'s Adam part, ``{"adam": (family, h, lr, notes)}``, and
    the weight-decay masks of both parts (Muon's ``weight_decay_mask``; Adam's has none)."""
    signature = pyinspect.signature(optax.contrib.muon)
    args = {**{k: p.default for k, p in signature.parameters.items()
               if p.default is not pyinspect.Parameter.empty}, **kwargs}
    lr = args["adam_learning_rate"]
    adam = {"learning_rate": args["learning_rate"] if lr is None else lr, "b1": args["adam_b1"],
            "b2": args["adam_b2"], "eps": args["eps"], "eps_root": args["adam_eps_root"],
            "weight_decay": args["adam_weight_decay"], "mu_dtype": args["mu_dtype"],
            "nesterov": args["nesterov"]}
    _, family_name, h, lr, notes = from_alias(optax.adamw, adam)
    return ({"adam": (family_name, h, lr, notes)},
            {"muon": args["weight_decay_mask"], "adam": None})


def muon_dimension_numbers(spec_numbers: Any, params: Any) -> list[Any]:
    """Each leaf's ``MuonDimensionNumbers`` (None: not a Muon matrix), as optax.contrib.muon
    resolves its ``muon_weight_dimension_numbers`` (None: every 2-D leaf, axes (0, 1))."""
    dn_type = optax.contrib.MuonDimensionNumbers
    if spec_numbers is None:
        return [dn_type() if np.ndim(x) == 2 else None for x in leaves(params)]
    numbers = spec_numbers(params) if callable(spec_numbers) else spec_numbers
    is_spec = lambda x: x is None or isinstance(x, dn_type)  # noqa: E731
    spread = jax.tree.map(lambda dn, sub: jax.tree.map(lambda _: dn, sub, is_leaf=is_masked),
                          numbers, params, is_leaf=is_spec)
    return jax.tree_util.tree_leaves(spread, is_leaf=is_spec)


def muon_arrays(h: dict[str, Any], arrays: dict[str, Any], grad: Any, t: Any,
                numbers: Any) -> dict[str, Any]:
    """``orthogonalized`` (O, recomputed as scale_by_muon computes it from the momentum after
    the step and the gradient), ``fan_in`` and ``fan_out`` of one Muon matrix."""
    from optax.contrib import _muon  # its Newton-Schulz function and fan products

    mu, beta = arrays["momentum_buffer"], h["beta"]
    if h["nesterov"]:
        u = (beta * optax.tree.bias_correction(mu, beta, t + 1)
             + (1 - beta) * optax.tree.bias_correction(grad, beta, t))
    else:
        u = optax.tree.bias_correction(mu, beta, t)
    o = _muon.orthogonalize_via_newton_schulz(u, h["ns_coeffs"], h["ns_steps"],
                                              h["preconditioning"], h["eps"], numbers)
    if h["adaptive"]:  # scaled by the dual norm
        o = jax.numpy.sum(u.conj() * o) * o
    fan_in, fan_out = _muon._get_shape_products(grad, numbers)
    return {"orthogonalized": o, "fan_in": fan_in, "fan_out": fan_out}


def group_kwargs(spec: dict[str, Any], label: str) -> dict[str, Any]:
    """The hyperparameters given for group ``label``: common ones, then ``groups[label]``."""
    return {**spec["kwargs"], **spec.get("groups", {}).get(label, {})}


def build_groups(groups: dict[str, list[Any]], spec: dict[str, Any]) -> list[GroupModel]:
    """Group models of the groups ``find_groups`` found, given the ``monitor`` spec (alias
    or chain); a group holding a state lrscope does not know is not modelled."""
    labels = list(groups)
    unknown = sorted(set(spec.get("groups", {})) - set(labels))
    if unknown:
        raise ValueError(f"groups= names {unknown}, but this optimizer's groups (multi_transform "
                         f"labels) are {labels}")
    out = []
    for label in labels:
        mine = groups[label]
        if unknown_nodes(mine):
            lr = (spec["lr"] if spec["alias"] is not None
                  else _translate(group_kwargs(spec, label)).get("lr"))
            out.append(GroupModel(label, None, None, {}, lr, "lr", (),
                                  notes=[_unknown_note(label, mine)]))
            continue
        inject = next((n for n in mine if isinstance(n, INJECT)
                       and "learning_rate" in n.hyperparams), None)
        readers = tuple(type(n) for n in mine if not isinstance(n, INJECT))
        injected: tuple[tuple[str, str], ...] = ()
        if spec["alias"] is not None:  # muon's Adam part has its own model
            family_name, h, lr, notes = spec.get("per_group", {}).get(
                label, (spec["family"], spec["h"], spec["lr"], spec["notes"]))
            notes = list(notes)
        else:
            given = set(_translate(group_kwargs(spec, label)))
            offered = {_RENAME.get(k, k): k for k in (inject.hyperparams if inject else ())
                       if _RENAME.get(k, k) not in given}
            family_name, h, lr, notes, injected = _chain_family(readers, spec, label, offered,
                                                                len(labels) > 1)
        module = formulas.family(family_name) if h is not None else None
        decay_scale = DECAY_SCALE.get(family_name or "", "lr")
        out.append(GroupModel(label, module, family_name, h or {}, lr, decay_scale, readers,
                              injected=injected, notes=notes))
    return out


def _unknown_note(label: str, nodes: list[Any]) -> str:
    """Why group ``label``, holding states lrscope does not know, is measured-only."""
    unknown = unknown_nodes(nodes)
    inside = jax.tree_util.tree_leaves(unknown, is_leaf=lambda x: type(x) in _READERS)
    known = [type(n).__name__ for n in nodes + inside if type(n) in _READERS]
    names = ", ".join(dict.fromkeys(type(n).__name__ for n in unknown))
    if known:
        why = (f"the {', '.join(dict.fromkeys(known))} state lrscope knows sits in or beside "
               f"{names}, a transformation it does not model")
    else:
        why = f"no optimizer state lrscope can read was found ({names} is not modelled)"
    return f"group {label}: {why}: {MEASURED}"


def _chain_family(readers: tuple[type, ...], spec: dict[str, Any], label: str,
                  offered: dict[str, str], shared: bool
                  ) -> tuple[str | None, dict[str, Any] | None, Any, list[str], tuple[tuple[str, str], ...]]:
    """Family, hyperparameters, lr and notes of a user-built chain, from its state nodes, and
    the injected hyperparameters to read from its state, as ``(formula name, optax name)``.

    ``offered`` maps the formula names of the hyperparameters an ``inject_hyperparams``
    state provides (those monitor() was not given) to their optax names; with ``shared``
    (several groups) the common hyperparameters apply to the groups whose family has
    them, ``groups[label]`` ones always.
    """
    signalled = [_READERS[t][0] for t in readers if _READERS[t][0] is not None]
    primary = next((f for f in signalled if f != "sgd"), "sgd" if signalled else None)
    common = _translate(dict(spec["kwargs"]))
    own = _translate(dict(spec.get("groups", {}).get(label, {})))
    family_name = own.pop("family", None) or spec["family"] or primary
    lr = own.pop("lr", common.pop("lr", None))
    if family_name is None:
        return None, None, lr, [f"group {label}: no optimizer state lrscope can read was found "
                                f"in this transformation: {MEASURED}"], ()
    if family_name not in VERIFIED:
        return family_name, None, lr, [f"group {label}: lrscope has no verified optax model of "
                                       f"{family_name}: {MEASURED}"], ()
    if family_name in ALIAS_ONLY:
        state = next((t.__name__ for t in readers if _READERS[t][0] == family_name),
                     f"{family_name} state")
        return family_name, None, lr, [
            f"group {label}: the {state} of a transformation you built does not say what "
            f"its base optimizer or dimension numbers are; lrscope models it through "
            f"{ALIAS_ONLY[family_name]} (monitor(alias, **arguments)): {MEASURED}"], ()
    traceable = _TRACEABLE | ({"weight_decay"} if family_name in _TRACEABLE_DECAY else set())
    injected = {k: v for k, v in offered.items() if k in traceable}
    known = formulas.family(family_name).DEFAULTS["optax"]
    args = {**{k: v for k, v in common.items() if not shared or k in known or k == "mask"}, **own}
    if "sgd" in signalled and family_name in ("sgd", "rmsprop") and "momentum" not in args:
        why = (f"is injected ({_UNREAD}), " if "momentum" in offered else "is unknown: ")
        return family_name, None, lr, [
            f"group {label}: a trace (momentum) state was found but its decay {why}pass "
            f"momentum= to lrscope.optax.monitor; {MEASURED}"], ()
    if family_name == "rmsprop" and any(t in readers for t in (optax.ScaleByRStdDevState,
                                                                _T.ScaleByRStdDevWithCountState)):
        args.setdefault("centered", True)
    h, notes = _family_hyper(family_name, args, {}, f"this {family_name} chain")
    if h is None:
        return family_name, None, lr, notes, ()
    optax_names = {"beta1": "b1", "beta2": "b2"}
    assumed = [k for k in sorted(h) if k not in args and k not in injected and k not in _FLAGS]
    absent, unread = [k for k in assumed if k not in offered], [k for k in assumed if k in offered]

    def defaults(names: list[str]) -> str:
        return ", ".join(f"{optax_names.get(k, k)}={h[k]!r}" for k in names)

    if absent:
        notes.append(f"group {label}: lrscope found the {family_name} state by the chain's "
                     f"structure and assumed optax's defaults {defaults(absent)} (not given "
                     "to monitor() nor injected; the model check 'model_error' tells whether "
                     "they reproduce the real update)")
    if unread:
        notes.append(f"group {label}: {', '.join(optax_names.get(k, k) for k in unread)} "
                     f"injected ({_UNREAD}): optax's defaults {defaults(unread)} assumed; pass "
                     "the values to lrscope.optax.monitor (the model check 'model_error' tells "
                     "whether the defaults reproduce the real update)")
    if lr is None and "lr" not in injected:
        notes.append(f"group {label}: the learning rate is neither injected "
                     "(optax.inject_hyperparams) nor given: pass learning_rate= to "
                     "lrscope.optax.monitor; lr and effective learning rates are NaN")
    return family_name, h, lr, notes, tuple(injected.items())


def readers_for(model: GroupModel) -> list[Callable[[Any, Any], dict[str, Any]]]:
    """Functions turning (old node, new node) into PyTorch-named arrays for the formula."""
    return [lambda old, new, t=t: _READERS[t][1](old, new, model.family_name or "")
            for t in model.node_types]
