"""``EffectiveLRCallback`` for ``model.fit`` and ``KerasMonitor`` for custom loops.

After every train batch the callback builds the StepReport of the step just taken (scalars every
step, distributions every ``every`` steps) and writes it to the sinks; ``callback.last``
is the latest report.  On the JAX backend ``fit`` keeps the variables outside the model
between batches; the callback asks the model to sync them (``jax_state_sync``) before
reading, as Keras documents for callbacks that read state.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator, Sequence

import keras

from lrscope._warnings import warn
from lrscope.formulas import Elementwise
from lrscope.keras.multi import reader_for
from lrscope.monitor import Monitor, checked_every, unmeasured
from lrscope.report import StepReport
from lrscope.sinks import Sink, checked


class KerasMonitor(Monitor):
    """Reports each real step of a Keras optimizer: call ``step()`` after ``apply``.

    ``before_step()`` (before ``apply``) records what the step overwrites: Adadelta's
    accumulated delta (optional); for Ftrl a copy of the variables, for Muon with Nesterov
    of its matrices, from which their direction d and update norms are measured (without
    it: eta alone); and, with ``empirical=True`` for an optimizer or option lrscope does
    not model, a copy of the variables, from which the report measures the realized
    update (|delta theta| distribution, update norms).  Each copy is taken on the steps
    with distributions only.  Micro-batches of gradient accumulation are not
    steps and produce no report; a LossScaleOptimizer step skipped for inf/NaN
    gradients produces a ``skipped`` report.

    >>> import numpy as np, keras, lrscope
    >>> w = keras.Variable(np.ones(3))
    >>> optimizer = keras.optimizers.Adam(1e-3, gradient_accumulation_steps=2)
    >>> monitor = lrscope.watch(optimizer)
    >>> for _ in range(4):
    ...     optimizer.apply([keras.ops.ones((3,), dtype=w.dtype)], [w])
    ...     report = monitor.step()
    ...     print(None if report is None else report.t)
    None
    1
    None
    2
    """

    def __init__(
        self,
        optimizer: Any,
        *,
        every: int = 1,
        log_dir: str | os.PathLike | None = None,
        sinks: Iterable[Sink] | None = None,
        name: str | None = None,
        empirical: bool = False,
        findings: bool = True,
    ):
        super().__init__(every=every, log_dir=log_dir, sinks=sinks, name=name, findings=findings)
        self.reader = reader_for(optimizer, empirical=empirical)
        if self.reader.notes:
            warn("lrscope: " + self.reader.notes[0])
        self._recorded: dict[int, dict[str, Any]] | None = None
        self._last_raw: int | None = None
        self._reported_t = self.reader.position()[1]

    def records_before(self) -> bool:
        """Whether ``before_step()`` has anything to record for the coming ``apply``: Adadelta's
        history, the variables (empirical mode) or those whose direction is measured (Ftrl,
        Muon's matrices with Nesterov), when that call steps and its distributions are
        wanted."""
        if self.reader.history() is None:
            return False
        raw, t, _ = self.reader.position()
        k = self.reader.accumulation_steps
        return (not k or (raw + 1) % k == 0) and bool(self.wants_distributions(t + 1))

    def before_step(self, variables: Sequence[Any] | None = None) -> None:
        """Record what the coming step overwrites, when its distributions are wanted.
        ``variables``: those the coming ``apply`` updates (default the optimizer's; pass them
        before its first ``apply``, which builds it)."""
        _, t, _ = self.reader.position()
        self._recorded = self.guarded(lambda wanted: self.reader.record_before(variables) if wanted else None,
                                      self.wants_distributions(t + 1), fallback=lambda error: None)

    def step(
        self, grads: Sequence[Any] | None = None, variables: Sequence[Any] | None = None
    ) -> StepReport | None:
        """Build, emit and return the report of the step just taken (None for a micro-batch)."""
        raw, t, moved = self.reader.position()
        if raw == self._last_raw and t:
            report = self.reader.report(distributions=False)
            report.skipped = True
            report.notes.append(
                "the step was skipped (LossScaleOptimizer found inf/NaN "
                "gradients): variables did not move and t did not advance"
            )
        elif not moved:
            report = None
        else:
            wanted, covered = self.wants_distributions(t), t - self.previous_t(t)
            # One report for several steps (fit's steps_per_execution): what before_step()
            # records was recorded before the first of them, not before the last.
            history = self.reader.history()
            stale = covered > 1 and history is not None
            skip_all = stale and history[1] == "distributions skipped"
            report = self.guarded(
                lambda distributions: self.reader.report(
                    distributions=distributions, grads=grads, variables=variables,
                    recorded=None if stale else self._recorded),
                wanted and not skip_all,
                fallback=lambda error: unmeasured(t, type(self.reader.optimizer).__name__, "keras",
                                                  self.reader.family, error),
            )
            if wanted and stale:
                needs, skipped = history
                report.notes.append(
                    f"{type(self.reader.optimizer).__name__}: this report covers {covered} steps "
                    f"(steps_per_execution) and {needs} from just before the last one: {skipped}")
        self._last_raw, self._recorded = raw, None
        if report is not None:
            self._emit(report)
        return report


class EffectiveLRCallback(keras.callbacks.Callback):
    """Report the effective learning rate of ``model.optimizer`` after each train batch.

    ``log_dir`` writes lrscope's default sinks there (TensorBoard event files, JSONL);
    ``sinks=[...]`` adds sinks of your own (the only ones without ``log_dir``).  The sinks
    are flushed and closed at the end of ``fit`` (a later ``fit`` opens them again).
    ``empirical`` (on by default, unlike ``lrscope.watch``): for an optimizer or option
    lrscope does not model, the realized update is measured on the steps with
    distributions, at the cost of one copy of the trainable variables on each of them.

    >>> import numpy as np, keras, lrscope.keras
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    >>> callback = lrscope.keras.EffectiveLRCallback()
    >>> _ = model.fit(np.ones((8, 3)), np.zeros((8, 2)), batch_size=4, epochs=1, verbose=0,
    ...               callbacks=[callback])
    >>> callback.last.t, round(callback.last.groups[0].step_size, 7)
    (2, 0.0002353)
    """

    def __init__(
        self,
        log_dir: str | os.PathLike | None = None,
        sinks: Iterable[Sink] | None = None,
        every: int = 1,
        name: str | None = None,
        empirical: bool = True,
    ):
        super().__init__()
        self._options: dict[str, Any] = {  # checked now: an error here, not when fit starts
            "log_dir": log_dir,
            "sinks": checked(sinks) or None,
            "every": checked_every(every),
            "name": name,
            "empirical": empirical,
        }
        self.monitor: KerasMonitor | None = None
        self._last: StepReport | None = None

    @property
    def last(self) -> StepReport | None:
        """The report of the latest step (kept after ``fit`` ends)."""
        return self.monitor.last if self.monitor is not None else self._last

    def _sync(self) -> None:
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.monitor = KerasMonitor(self.model.optimizer, **self._options)

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if self.monitor is not None and self.monitor.records_before():
            self._sync()
            # (On TensorFlow the optimizer is built inside the first step: the model's
            # variables are the ones it will update, in its order.)
            self.monitor.before_step(self.model.trainable_variables)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.monitor is not None:
            self._sync()
            self.monitor.step()

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.monitor is not None:
            self._last = self.monitor.last
            self.monitor.close()
            self.monitor = None


def inspect(
    optimizer: Any,
    *,
    grads: Sequence[Any] | None = None,
    variables: Sequence[Any] | None = None,
    distributions: bool = True,
) -> StepReport:
    """StepReport of the last step from the optimizer's variables (see lrscope.inspect).

    ``grads`` (with ``variables``, default the optimizer's) are the gradients passed to
    ``apply``: they give the update norms of families whose direction needs g.

    >>> import numpy as np, keras
    >>> w = keras.Variable(np.array([1.0, -2.0]))
    >>> optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    >>> for _ in range(2):
    ...     optimizer.apply([keras.ops.convert_to_tensor(np.array([1.0, 1.0]))], [w])
    >>> report = inspect(optimizer)
    >>> report.t, report.groups[0].lr, round(report.groups[0].update_norm, 4)
    (2, 0.1, 0.2687)
    """
    return reader_for(optimizer).report(
        distributions=distributions, grads=grads, variables=variables
    )


def watch(optimizer: Any, **options: Any) -> Monitor:
    """KerasMonitor on ``optimizer`` (see lrscope.watch and KerasMonitor)."""
    return KerasMonitor(optimizer, **options)


def elementwise(
    optimizer: Any,
    grads: Sequence[Any] | None = None,
    variables: Sequence[Any] | None = None,
    recorded: dict[int, dict[str, Any]] | None = None,
) -> Iterator[tuple[str, Elementwise]]:
    """``(variable path, Elementwise)`` of every variable of the last step (for tests).

    >>> import numpy as np, keras
    >>> w = keras.Variable(np.array([1.0, -2.0]), name="w")
    >>> optimizer = keras.optimizers.Adagrad(0.1)
    >>> grads = [keras.ops.convert_to_tensor(np.array([3.0, 4.0]))]
    >>> optimizer.apply(grads, [w])
    >>> [(name, np.round(keras.ops.convert_to_numpy(el.eta), 4).tolist())
    ...  for name, el in elementwise(optimizer, grads=grads)]
    [('w', [0.0331, 0.0249])]
    """
    yield from reader_for(optimizer).each_elementwise(grads, variables, recorded)
