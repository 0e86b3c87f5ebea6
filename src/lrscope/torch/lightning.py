"""``EffectiveLRMonitor``: a Lightning callback watching every optimizer of the trainer.

Lightning's own ``LearningRateMonitor`` logs the scheduled lr; this callback logs, under the
same ``lr-<Optimizer>`` names (``lr-Adam-1`` for a second Adam), what the steps really took:
alpha_t every step and the effective-lr distributions every ``every`` steps, to the
trainer's loggers (TensorBoard, CSV, W&B, MLflow: whatever the trainer has), at the
optimizer's step t, or with ``x_axis="global_step"`` at the trainer's ``global_step``.  It attaches ``lrscope.watch`` to each optimizer when training starts,
on the global-zero process only, and closes the monitors when training ends.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Iterable

from lrscope._optional import require
from lrscope.torch.monitor import TorchMonitor
from lrscope.torch.optimizers import unwrap
from lrscope.monitor import checked_every
from lrscope.report import StepReport
from lrscope.sinks import Sink, checked


def _lightning() -> Any:
    """``lightning.pytorch``, or the older ``pytorch_lightning`` package."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError:
            pl = require("lightning.pytorch", "lightning")  # raises, naming the extra
    return pl


#: The x-axes ``EffectiveLRMonitor`` logs at.
X_AXES = ("t", "global_step")


class LoggerSink:
    """Writes each report's scalars (``report.scalars()``) to a trainer's loggers at step t,
    or with ``x_axis="global_step"`` at the trainer's ``global_step`` counting this step.

    Lightning counts an optimizer step in ``global_step`` once ``optimizer.step()`` has
    returned, and lrscope reports from inside it: the step is ``global_step + 1``, the value
    your ``training_step`` reads after the step.  (Inline, on the training thread: it reads
    the trainer's state when the step is taken.)
    """

    def __init__(self, trainer: Any, x_axis: str = "t"):
        self.trainer = trainer
        self.x_axis = x_axis

    def write(self, report: StepReport) -> None:
        if report.skipped:  # GradScaler skipped it: t did not advance
            return
        step = report.t if self.x_axis == "t" else self.trainer.global_step + 1
        for logger in self.trainer.loggers:
            logger.log_metrics(report.scalars(), step=step)

    def close(self) -> None:
        """The trainer owns its loggers and closes them itself."""


class _Shared:
    """A sink that the monitors of several optimizers write to; its owner closes it once."""

    def __init__(self, sink: Sink):
        self.sink = sink
        self.background = getattr(sink, "background", False)

    def write(self, report: StepReport) -> None:
        self.sink.write(report)

    def close(self) -> None:
        """Closed by ``EffectiveLRMonitor`` once every monitor has closed."""


class EffectiveLRMonitor(_lightning().Callback):
    """``Trainer(callbacks=[EffectiveLRMonitor(every=50)])``.

    ``every``: steps between distributions (scalars are logged every step); ``log_dir`` and
    ``sinks``: lrscope's own sinks besides the trainer's loggers (``loggers=False`` leaves
    those out), shared by the optimizers and closed when training ends; ``empirical`` (on
    by default, unlike ``lrscope.watch``): for an optimizer lrscope does not model, the
    realized update is measured on the steps with distributions, at the cost of one copy of
    its parameters on each of those steps (a modelled optimizer's update comes from its
    state, without a copy, either way).  ``monitors`` holds one TorchMonitor per optimizer
    while training runs (their ``last`` is each one's latest StepReport).

    With a distributed strategy (DDP, FSDP, ...) the callback watches on every rank and rank
    0 logs the whole model (``distributed``, as in ``lrscope.watch``: False gives per-rank
    reports instead).

    ``x_axis``: the step the trainer's loggers receive: ``"t"`` (the default), each
    optimizer's own step count (with two optimizers each logs t = 1, 2, ...), or
    ``"global_step"``, the trainer's ``global_step`` after the step.  With automatic
    optimization and one optimizer the two agree; with manual optimization and several
    optimizers ``global_step`` counts every optimizer's steps, and ``"global_step"`` lines
    lrscope's series up with metrics you log at ``self.global_step``.  lrscope's own sinks
    (``log_dir``, ``sinks``) always log at t.
    """

    def __init__(self, every: int = 50, *, log_dir: str | os.PathLike | None = None,
                 sinks: Iterable[Sink] | None = None, loggers: bool = True, empirical: bool = True,
                 distributed: bool | None = None, x_axis: str = "t"):
        super().__init__()
        if x_axis not in X_AXES:
            raise ValueError(f"x_axis must be one of {', '.join(map(repr, X_AXES))}, got {x_axis!r}")
        self.x_axis = x_axis
        self.every = checked_every(every)  # an error now, not when training starts
        self.log_dir = log_dir
        self.sinks = checked(sinks)
        self.loggers = loggers
        self.empirical = empirical
        self.distributed = distributed
        self.monitors: list[TorchMonitor] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._close()
        seen: Counter[str] = Counter()
        for optimizer in trainer.optimizers:
            cls = type(unwrap(optimizer)).__name__
            name = f"{cls}-{seen[cls]}" if seen[cls] else None  # Lightning's lr-Adam, lr-Adam-1
            seen[cls] += 1
            sinks = [*([LoggerSink(trainer, self.x_axis)] if self.loggers else []),
                     *map(_Shared, self.sinks)]
            self.monitors.append(TorchMonitor(optimizer, model=pl_module, every=self.every,
                                              log_dir=self.log_dir, sinks=sinks, name=name,
                                              empirical=self.empirical, distributed=self.distributed))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if not self.monitors:
            return
        for monitor in self.monitors:
            monitor.close()
        self.monitors = []
        for sink in self.sinks:
            sink.close()
