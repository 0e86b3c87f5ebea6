"""TF1 backend: ``tf.compat.v1.train`` optimizers in graph mode.

Everything is built as graph tensors once, after ``apply_gradients``/``minimize``, and
evaluated with the user's session after ``sess.run(train_op)``:

* ``step_size(optimizer)``: alpha_t of the step just taken.  TF1 Adam updates its
  ``beta1_power``/``beta2_power`` variables *after* the variables, so after step t they
  hold beta**(t+1); this tensor divides them by beta once.  ``next_step_size`` is the
  value the next step will use (what ``_lr_t * sqrt(1 - b2p) / (1 - b1p)`` gives).
* ``effective_lr(optimizer)``: per-variable eta tensors (``lrscope.tf1.monitor``
  turns them into ``tf.compat.v1.summary`` ops).
* ``inspect(optimizer, session=sess)``: a StepReport, its statistics computed in the
  graph (float32 bit buckets, exact reductions) and fetched in one ``session.run``.

TF1 keeps no gradients after the step: for GradientDescent, Adagrad and Nesterov
Momentum the direction (hence the update norms) is unknown and left out, eta is exact.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Iterable

import tensorflow as tf

from lrscope import formulas
from lrscope.tf1 import stats as tf1_stats
from lrscope.formulas import Elementwise
from lrscope.report import GroupReport, StepReport

_TRAIN = tf.compat.v1.train
#: tf.compat.v1.train classes lrscope models exactly, with their family.
FAMILY_OF: dict[type, str] = {
    _TRAIN.AdamOptimizer: "adam", _TRAIN.GradientDescentOptimizer: "sgd",
    _TRAIN.MomentumOptimizer: "sgd", _TRAIN.RMSPropOptimizer: "rmsprop",
    _TRAIN.AdagradOptimizer: "adagrad", _TRAIN.AdadeltaOptimizer: "adadelta",
}
#: The tensor ``_prepare()`` stores the learning rate in, by family.
_LR_TENSOR = {"adam": "_lr_t", "sgd": "_learning_rate_tensor",
              "rmsprop": "_learning_rate_tensor", "adagrad": "_learning_rate_tensor",
              "adadelta": "_lr_t"}
#: The slot that marks a variable as trained by the optimizer.
_SLOT = {"adam": "m", "sgd": "momentum", "rmsprop": "rms", "adagrad": "accumulator",
         "adadelta": "accum"}
#: Per-variable tensors that the step overwrote, {variable name: value before the step}.
Before = dict[str, Any]
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def accepts(obj: Any) -> bool:
    return isinstance(obj, _TRAIN.Optimizer)


def family_of(optimizer: Any) -> str:
    """The family of a supported optimizer; TypeError naming the supported ones otherwise."""
    cls = type(optimizer)
    for base in cls.__mro__:
        if base in FAMILY_OF:
            if all(
                getattr(cls, m) is getattr(base, m)
                for m in ("_apply_dense", "_resource_apply_dense")
            ):
                return FAMILY_OF[base]
            break
    supported = ", ".join(sorted(c.__name__ for c in FAMILY_OF))
    raise TypeError(
        f"lrscope.tf1 models {supported} exactly; {cls.__name__} is not one of them "
        "(or overrides its update): log its learning rate tensor instead"
    )


def _prepared(optimizer: Any, attribute: str) -> tf.Tensor:
    value = getattr(optimizer, attribute, None)
    if value is None:
        raise RuntimeError(
            f"{type(optimizer).__name__} has not built its update yet: call "
            "lrscope.tf1 after optimizer.apply_gradients() or minimize()"
        )
    return value


def learning_rate(optimizer: Any) -> tf.Tensor:
    """The optimizer's learning-rate tensor (``_lr_t`` / ``_learning_rate_tensor``).

    A rate computed from ``global_step`` (``tf.compat.v1.train.exponential_decay``) read
    after the step shows the *next* step's value, because ``apply_gradients`` already
    incremented ``global_step``.
    """
    family = family_of(optimizer)
    return _prepared(optimizer, _LR_TENSOR[family])


def _beta_powers(optimizer: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """Adam's beta1**(t+1), beta2**(t+1) after step t (TF1 updates them after the variables)."""
    b1p, b2p = optimizer._get_beta_accumulators()
    return tf.convert_to_tensor(b1p), tf.convert_to_tensor(b2p)


def _powers_of_step(optimizer: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """beta1**t, beta2**t of the step just taken, as the float32 values that step used.

    The division happens in float64 and is rounded back: float32 ``p * beta`` is then
    inverted exactly (grappler may turn a float32 ``p / beta`` into ``p * (1 / beta)``,
    off by an ulp, which ``1 - beta2**t`` magnifies a thousandfold).
    """
    powers = []
    for power, beta in zip(_beta_powers(optimizer), ("_beta1_t", "_beta2_t")):
        beta = tf.cast(_prepared(optimizer, beta), tf.float64)
        powers.append(tf.cast(tf.cast(power, tf.float64) / beta, power.dtype))
    return powers[0], powers[1]


def step_size(optimizer: Any) -> tf.Tensor:
    """alpha_t of the step just taken, as a tensor to ``sess.run`` after ``train_op``.

    Adam: ``lr * sqrt(1 - beta2**t) / (1 - beta1**t)`` from the stored powers divided
    by beta once; the other families: the learning rate.

    >>> import tensorflow as tf
    >>> with tf.Graph().as_default():
    ...     w = tf.compat.v1.get_variable("w", initializer=[1.0, -2.0])
    ...     optimizer = tf.compat.v1.train.AdamOptimizer(1e-3)
    ...     train_op = optimizer.minimize(tf.reduce_sum(w * w))
    ...     alpha, upcoming = step_size(optimizer), next_step_size(optimizer)
    ...     with tf.compat.v1.Session() as sess:
    ...         sess.run(tf.compat.v1.global_variables_initializer())
    ...         for _ in range(2):
    ...             _ = sess.run(train_op)
    ...         print(*(round(float(x), 7) for x in sess.run([alpha, upcoming])))
    0.0002353 0.000202
    """
    family = family_of(optimizer)
    lr = learning_rate(optimizer)
    if family != "adam":
        return tf.identity(lr, name="lrscope_step_size")
    b1p, b2p = (tf.cast(p, tf.float64) for p in _powers_of_step(optimizer))
    alpha = tf.cast(lr, tf.float64) * tf.sqrt(1 - b2p) / (1 - b1p)
    return tf.cast(alpha, lr.dtype, name="lrscope_step_size")


def next_step_size(optimizer: Any) -> tf.Tensor:
    """alpha_{t+1}: what the *next* step will use (the popular ``_beta1_power`` recipe)."""
    if family_of(optimizer) != "adam":
        return step_size(optimizer)
    b1p, b2p = _beta_powers(optimizer)
    return tf.identity(
        learning_rate(optimizer) * tf.sqrt(1 - b2p) / (1 - b1p), name="lrscope_next_step_size"
    )


def trained_variables(optimizer: Any, var_list: Iterable[Any] | None = None) -> list[Any]:
    """The variables the optimizer updates: those with its slots (or ``var_list``).

    GradientDescent has no slots: all trainable variables of the graph unless
    ``var_list`` says otherwise.
    """
    family = family_of(optimizer)
    candidates = list(var_list) if var_list is not None else tf.compat.v1.trainable_variables()
    if family == "sgd" and not isinstance(optimizer, _TRAIN.MomentumOptimizer):
        return candidates
    return [v for v in candidates if optimizer.get_slot(v, _SLOT[family]) is not None]


def _number(optimizer: Any, attribute: str) -> float:
    value = getattr(optimizer, attribute)
    if callable(value):
        value = value()
    try:
        return float(value)
    except TypeError:
        raise TypeError(
            f"lrscope.tf1 needs {attribute.lstrip('_')} as a number, got {value!r}"
        ) from None


def _has_direction(optimizer: Any, family: str) -> bool:
    """Whether d can be read from the slots (TF1 keeps no gradients after the step)."""
    if family == "sgd":
        return isinstance(optimizer, _TRAIN.MomentumOptimizer) and not optimizer._use_nesterov
    return family not in ("adagrad", "adadelta")


def _hyper_and_state(
    optimizer: Any, family: str, var: Any, acc_delta_before: Before | None
) -> tuple[dict[str, Any], dict[str, Any], str]:
    dtype = var.dtype.base_dtype
    lr = tf.cast(learning_rate(optimizer), dtype)
    param = tf.convert_to_tensor(var)
    # Where TF1 keeps no gradient the formula still needs the key; eta does not depend on it.
    state: dict[str, Any] = {"param": param, "grad": tf.zeros_like(param)}
    if family == "adam":
        b1p, b2p = _powers_of_step(optimizer)
        state.update(
            exp_avg=optimizer.get_slot(var, "m"),
            exp_avg_sq=optimizer.get_slot(var, "v"),
            beta1_power=tf.cast(b1p, dtype),
            beta2_power=tf.cast(b2p, dtype),
        )
        h = formulas.hyperparameters(
            "adam", "tf1", beta1=_number(optimizer, "_beta1"), beta2=_number(optimizer, "_beta2")
        )
        h.update(lr=lr, eps=tf.cast(_prepared(optimizer, "_epsilon_t"), dtype))
        return h, state, "tf1"
    if family == "sgd":
        momentum = isinstance(optimizer, _TRAIN.MomentumOptimizer)
        h = {
            "lr": lr,
            "momentum": _number(optimizer, "_momentum") if momentum else 0.0,
            "nesterov": momentum and bool(optimizer._use_nesterov),
            "weight_decay": 0.0,
        }
        if momentum:
            state["momentum_buffer"] = optimizer.get_slot(var, "momentum")
        return h, state, "tf1"
    if family == "rmsprop":
        h = {
            "lr": lr,
            "momentum": _number(optimizer, "_momentum"),
            "centered": bool(optimizer._centered),
            "eps": tf.cast(_prepared(optimizer, "_epsilon_tensor"), dtype),
        }
        state.update(
            square_avg=optimizer.get_slot(var, "rms"),
            momentum_buffer=optimizer.get_slot(var, "momentum"),
        )
        if h["centered"]:
            state["grad_avg"] = optimizer.get_slot(var, "mg")
        return h, state, "tf1"
    if family == "adadelta":
        if acc_delta_before is None or _name(var) not in acc_delta_before:
            raise ValueError("Adadelta's eta needs its accumulated delta from before the step: "
                             "use lrscope.watch(optimizer, session=sess), which records it")
        # TF1 Adadelta is Keras' rule: eta = lr * sqrt(A_before + eps) / sqrt(E + eps).
        state.update(square_avg=optimizer.get_slot(var, "accum"),
                     acc_delta_before=acc_delta_before[_name(var)])
        eps = tf.cast(_prepared(optimizer, "_epsilon_t"), dtype)
        return {"lr": lr, "eps": eps, "weight_decay": 0.0}, state, "keras"
    # TF1 Adagrad is Keras' rule without eps: eta = lr / sqrt(S).
    state["sum"] = optimizer.get_slot(var, "accumulator")
    return {"lr": lr, "eps": 0.0, "weight_decay": 0.0}, state, "keras"


def elementwise(optimizer: Any, var: Any, acc_delta_before: Before | None = None) -> Elementwise:
    """eta and d tensors of ``var``'s last step (d is meaningless where TF1 keeps no gradient).

    Adadelta needs ``acc_delta_before``: ``{variable name: its accum_update before the step}``.
    """
    family = family_of(optimizer)
    h, state, convention = _hyper_and_state(optimizer, family, var, acc_delta_before)
    state = {k: tf.convert_to_tensor(v) for k, v in state.items()}
    return formulas.family(family).elementwise(tf, state, None, h, convention)


def _name(var: Any) -> str:
    return var.op.name


def effective_lr(
    optimizer: Any, var_list: Iterable[Any] | None = None, acc_delta_before: Before | None = None
) -> dict[str, tf.Tensor]:
    """``{variable name: eta tensor}`` of the step just taken (same shape as the variable).

    >>> import tensorflow as tf
    >>> with tf.Graph().as_default():
    ...     w = tf.compat.v1.get_variable("w", initializer=[3.0, 4.0])
    ...     optimizer = tf.compat.v1.train.AdagradOptimizer(0.1)
    ...     train_op = optimizer.minimize(tf.reduce_sum(w * w))
    ...     etas = effective_lr(optimizer)
    ...     with tf.compat.v1.Session() as sess:
    ...         sess.run(tf.compat.v1.global_variables_initializer())
    ...         _ = sess.run(train_op)
    ...         print([round(float(eta), 5) for eta in sess.run(etas)["w"]])
    [0.01664, 0.01249]
    """
    out = {}
    for var in trained_variables(optimizer, var_list):
        eta = elementwise(optimizer, var, acc_delta_before).eta
        out[_name(var)] = tf.broadcast_to(eta, tf.shape(var))
    return out


def _fetches(
    optimizer: Any, var_list: Iterable[Any] | None, acc_delta_before: Before | None = None
) -> dict[str, Any]:
    """The graph tensors of a report, built once per (optimizer, graph, var_list)."""
    graph = tf.compat.v1.get_default_graph()
    variables = trained_variables(optimizer, var_list)
    key = (graph, tuple(id(v) for v in variables), id(acc_delta_before))
    per_optimizer = _cache.setdefault(optimizer, {})
    if key not in per_optimizer and graph.finalized:
        raise RuntimeError(
            "lrscope builds its ops in the graph on first use, and this graph is finalized "
            "(MonitoredTrainingSession finalizes it): call lrscope.tf1.report_ops(optimizer) "
            "after minimize()/apply_gradients() and before creating the session (the same "
            "var_list as watch/inspect get, if any); lrscope.watch(optimizer, session=sess) then "
            "reuses those ops")
    if key not in per_optimizer:
        family = family_of(optimizer)
        with_update = _has_direction(optimizer, family)
        stats = {}
        with tf.name_scope("lrscope"):
            for var in variables if family != "adadelta" or acc_delta_before else ():
                el = elementwise(optimizer, var, acc_delta_before)
                stats[_name(var)] = tf1_stats.statistics(el, tf.convert_to_tensor(var), with_update)
            fetch: dict[str, Any] = {
                "lr": learning_rate(optimizer),
                "step_size": step_size(optimizer),
                "stats": stats,
                "shapes": {_name(v): tuple(v.shape.as_list()) for v in variables},
            }
            if family == "adam":
                fetch["powers"] = _beta_powers(optimizer)
            global_step = tf.compat.v1.train.get_global_step(graph)
            if global_step is not None:
                fetch["global_step"] = tf.convert_to_tensor(global_step)
        per_optimizer[key] = fetch
    return per_optimizer[key]


def report_ops(
    optimizer: Any, var_list: Iterable[Any] | None = None, acc_delta_before: Before | None = None
) -> None:
    """Build the graph ops ``inspect`` runs, ahead of a graph that will be finalized
    (``MonitoredTrainingSession``)."""
    _fetches(optimizer, var_list, acc_delta_before)


def _step_index(optimizer: Any, values: dict[str, Any]) -> tuple[int, list[str]]:
    if "powers" in values:
        # After step t the powers hold beta**(t+1); b1**t underflows float32 near t = 850.
        b1p, b2p = (float(p) for p in values["powers"])
        b1, b2 = _number(optimizer, "_beta1"), _number(optimizer, "_beta2")
        power, beta = (b1p, b1) if b1p > 1e-30 else (b2p, b2)
        if power > 0 and 0 < beta < 1:
            return int(round(math.log(power) / math.log(beta))) - 1, []
    if "global_step" in values:
        return int(values["global_step"]), ["t read from global_step"]
    return 0, ["t unknown: no Adam powers and no global_step in the graph"]


def inspect(
    optimizer: Any,
    *,
    session: Any = None,
    var_list: Iterable[Any] | None = None,
    distributions: bool = True,
    acc_delta_before: Before | None = None,
) -> StepReport:
    """StepReport of the step just taken, evaluated with ``session`` (graph mode).

    The graph ops are built on the first call for this optimizer and graph, then
    reused; call ``report_ops(optimizer)`` first if the graph gets finalized.
    Without ``distributions`` only the scalars are fetched.  Adadelta's eta needs
    ``acc_delta_before`` (``lrscope.watch`` records it); without it a note says so.
    """
    if session is None:
        raise TypeError("lrscope.inspect on a tf.compat.v1.train optimizer needs session=sess")
    family = family_of(optimizer)
    with session.graph.as_default():
        fetch = _fetches(optimizer, var_list, acc_delta_before)
    skip = {"shapes"} if distributions else {"shapes", "stats"}
    values = session.run({k: v for k, v in fetch.items() if k not in skip})
    t, notes = _step_index(optimizer, values)
    if family == "adadelta" and not acc_delta_before:
        notes.append("Adadelta: the accumulated delta before the step was not recorded "
                     "(use lrscope.watch(optimizer, session=sess)); its distribution is skipped")
    if not _has_direction(optimizer, family):
        notes.append(
            f"{type(optimizer).__name__} keeps no gradient after the step: eta is exact, "
            "update norms are not available"
        )
    raw_lr = getattr(optimizer, "_lr" if _LR_TENSOR[family] == "_lr_t" else "_learning_rate")
    if not isinstance(raw_lr, (int, float)):
        notes.append(
            "lr is a tensor read after the step: if it depends on global_step it is the "
            "next step's value"
        )
    params = tf1_stats.param_reports(values.get("stats", {}), fetch["shapes"])
    group = GroupReport.combine(
        params,
        name="pg0",
        lr=float(values["lr"]),
        step_size=float(values["step_size"]),
        weight_decay_rate=0.0,
    )
    return StepReport(
        t=t,
        optimizer=type(optimizer).__name__,
        framework="tf1",
        family=family,
        groups=[group],
        notes=notes,
    )
