"""TF1 graph mode: ``tf.compat.v1.summary`` ops and a monitor you step by hand.

Graph mode has no hooks to attach to: ``summaries(optimizer)`` gives summary ops to
merge and write with your own FileWriter, ``TF1Monitor.step()`` (what
``lrscope.watch(optimizer, session=sess)`` returns) builds the report of the step just
taken and writes it to lrscope's sinks.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import tensorflow as tf

from lrscope.tf1.reader import (
    _has_direction,
    _name,
    elementwise,
    family_of,
    inspect,
    learning_rate,
    report_ops,
    step_size,
    trained_variables,
)
from lrscope.monitor import Monitor, unmeasured
from lrscope.report import StepReport
from lrscope.sinks import Sink


def summaries(
    optimizer: Any,
    var_list: Iterable[Any] | None = None,
    prefix: str | None = None,
    histograms: bool = True,
    acc_delta_before: dict[str, Any] | None = None,
) -> tf.Tensor:
    """A merged ``tf.compat.v1.summary`` op: lr, step_size, eta min/mean/max, eps_dominated
    and update_to_param of group ``pg0``, plus a histogram of eta per variable.

    Tags are ``<prefix>/pg0/<metric>`` with ``prefix = "lr-<OptimizerClass>"`` as in
    ``StepReport.scalars()``.  The ops are also added to the SUMMARIES collection, so use
    either this op or ``tf.compat.v1.summary.merge_all()``, not both.  Adadelta needs
    ``acc_delta_before`` (see ``lrscope.tf1.elementwise``).

    >>> import tensorflow as tf
    >>> with tf.Graph().as_default():
    ...     w = tf.compat.v1.get_variable("w", initializer=[1.0, -2.0])
    ...     optimizer = tf.compat.v1.train.AdamOptimizer(1e-3)
    ...     train_op = optimizer.minimize(tf.reduce_sum(w * w))
    ...     summary_op = summaries(optimizer)
    ...     with tf.compat.v1.Session() as sess:
    ...         sess.run(tf.compat.v1.global_variables_initializer())
    ...         _ = sess.run(train_op)
    ...         event = tf.compat.v1.Summary.FromString(sess.run(summary_op))
    >>> for tag in sorted(v.tag for v in event.value)[:4]:
    ...     print(tag)
    lr-AdamOptimizer/pg0/effective_lr/max
    lr-AdamOptimizer/pg0/effective_lr/mean
    lr-AdamOptimizer/pg0/effective_lr/min
    lr-AdamOptimizer/pg0/eps_dominated
    """
    family = family_of(optimizer)
    prefix = prefix or f"lr-{type(optimizer).__name__}"
    ops = [
        tf.compat.v1.summary.scalar(f"{prefix}/pg0/lr", learning_rate(optimizer)),
        tf.compat.v1.summary.scalar(f"{prefix}/pg0/step_size", step_size(optimizer)),
    ]
    # Per-variable reductions, combined: no concatenated copy of the model's eta.
    parts: dict[str, list[tf.Tensor]] = {
        name: [] for name in ("min", "max", "sum", "count", "dominated", "update_sq", "param_sq")
    }
    for var in trained_variables(optimizer, var_list):
        el = elementwise(optimizer, var, acc_delta_before)
        param = tf.convert_to_tensor(var)
        eta = tf.cast(tf.broadcast_to(el.eta, tf.shape(param)), tf.float64)
        if histograms:
            ops.append(
                tf.compat.v1.summary.histogram(f"{prefix}/pg0/{_name(var)}/effective_lr", eta)
            )
        parts["min"].append(tf.reduce_min(eta))
        parts["max"].append(tf.reduce_max(eta))
        parts["sum"].append(tf.reduce_sum(eta))
        parts["count"].append(tf.cast(tf.size(eta), tf.float64))
        if el.eps_dominated is not None:
            parts["dominated"].append(
                tf.reduce_sum(
                    tf.cast(tf.broadcast_to(el.eps_dominated, tf.shape(param)), tf.float64)
                )
            )
        parts["update_sq"].append(tf.reduce_sum(tf.cast(el.update(param), tf.float64) ** 2))
        parts["param_sq"].append(tf.reduce_sum(tf.cast(param, tf.float64) ** 2))
    if parts["count"]:
        count = tf.add_n(parts["count"])
        ops += [
            tf.compat.v1.summary.scalar(
                f"{prefix}/pg0/effective_lr/min", tf.reduce_min(parts["min"])
            ),
            tf.compat.v1.summary.scalar(
                f"{prefix}/pg0/effective_lr/mean", tf.add_n(parts["sum"]) / count
            ),
            tf.compat.v1.summary.scalar(
                f"{prefix}/pg0/effective_lr/max", tf.reduce_max(parts["max"])
            ),
        ]
        if parts["dominated"]:
            ops.append(
                tf.compat.v1.summary.scalar(
                    f"{prefix}/pg0/eps_dominated", tf.add_n(parts["dominated"]) / count
                )
            )
        if _has_direction(optimizer, family):
            ratio = tf.sqrt(tf.add_n(parts["update_sq"])) / tf.sqrt(tf.add_n(parts["param_sq"]))
            ops.append(tf.compat.v1.summary.scalar(f"{prefix}/pg0/update_to_param", ratio))
    return tf.compat.v1.summary.merge(ops)


class TF1Monitor(Monitor):
    """Reports each step when told: call ``mon.step()`` after every ``sess.run(train_op)``.

    Graph mode has no hooks to attach to; ``step()`` runs the report ops (scalars every
    step, distributions every ``every`` steps) and writes the report to the sinks.  For
    Adadelta it keeps a copy of each ``accum_update`` slot (in its own variables, outside
    every collection) from one ``step()`` to the next: the value the following step starts
    from, which Adadelta's eta needs and the slot no longer holds after that step.

    >>> import tensorflow as tf, lrscope
    >>> with tf.Graph().as_default():
    ...     w = tf.compat.v1.get_variable("w", initializer=[1.0, -2.0])
    ...     optimizer = tf.compat.v1.train.RMSPropOptimizer(0.01, momentum=0.9)
    ...     train_op = optimizer.minimize(tf.reduce_sum(w * w))
    ...     with tf.compat.v1.Session() as sess:
    ...         sess.run(tf.compat.v1.global_variables_initializer())
    ...         monitor = lrscope.watch(optimizer, session=sess, every=2)
    ...         for _ in range(3):
    ...             _ = sess.run(train_op)
    ...             report = monitor.step()
    ...         monitor.close()
    >>> report.t, report.groups[0].lr == report.groups[0].step_size
    (3, True)
    >>> report.groups[0].effective_lr.count  # distributions on steps 1 and 3
    2
    """

    def __init__(
        self,
        optimizer: Any,
        *,
        session: Any,
        every: int = 1,
        log_dir: str | os.PathLike | None = None,
        sinks: Iterable[Sink] | None = None,
        var_list: Iterable[Any] | None = None,
        name: str | None = None,
        findings: bool = True,
    ):
        super().__init__(every=every, log_dir=log_dir, sinks=sinks, name=name, findings=findings)
        self.optimizer, self.session = optimizer, session
        self.var_list = None if var_list is None else list(var_list)
        self._calls = 0
        self._before: dict[str, Any] | None = None
        self._record: Any = None
        with session.graph.as_default():
            if family_of(optimizer) == "adadelta":
                self._before, self._record = _recorder(optimizer, self.var_list)
                session.run([v.initializer for v in self._before.values()])
                session.run(self._record)
            report_ops(optimizer, self.var_list, self._before)

    def step(self) -> StepReport:
        """Build, emit and return the report of the step just taken."""
        self._calls += 1
        report = self.guarded(
            lambda distributions: inspect(self.optimizer, session=self.session, var_list=self.var_list,
                                          distributions=distributions, acc_delta_before=self._before),
            self.wants_distributions(self._calls),
            fallback=lambda error: unmeasured(0, type(self.optimizer).__name__, "tf1", None, error),
        )
        if self._record is not None:
            self.session.run(self._record)
        if report.t == 0:  # no Adam powers and no global_step to read it from
            report.t = self._calls
            report.notes = [n for n in report.notes if not n.startswith("t unknown")]
            report.notes.append("t counted by the monitor's step() calls")
        self._emit(report)
        self._reported_t = self._calls  # the schedule counts step() calls, one per train step
        return report


def _recorder(optimizer: Any, var_list: list[Any] | None) -> tuple[dict[str, Any], Any]:
    """Variables holding each ``accum_update`` slot, and the op copying the slots into them."""
    before, copies = {}, []
    with tf.name_scope("lrscope"):
        for var in trained_variables(optimizer, var_list):
            slot = optimizer.get_slot(var, "accum_update")
            copy = tf.compat.v1.Variable(tf.zeros(slot.shape, slot.dtype.base_dtype),
                                         trainable=False, collections=[], use_resource=True,
                                         name="acc_delta_before")
            before[_name(var)] = copy
            copies.append(copy.assign(slot))
    return before, tf.group(*copies)


def watch(optimizer: Any, *, session: Any = None, **options: Any) -> TF1Monitor:
    """TF1Monitor on ``optimizer`` (see lrscope.watch); needs ``session=``."""
    if session is None:
        raise TypeError("lrscope.watch on a tf.compat.v1.train optimizer needs session=sess")
    return TF1Monitor(optimizer, session=session, **options)
