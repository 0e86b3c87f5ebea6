"""``EffectiveLRCallback``: a Hugging Face ``Trainer`` callback watching the Trainer's optimizer.

When training begins it attaches ``lrscope.watch`` to the optimizer the Trainer built (the
``AcceleratedOptimizer`` around it is seen through), with the model for the tensors' names,
on the main process only; it closes the monitor when training ends.  Without ``log_dir``
or ``sinks`` the reports go to ``<output_dir>/lrscope`` (TensorBoard event files and
``lrscope.jsonl``), beside the Trainer's own TensorBoard runs under ``<output_dir>/runs``.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from lrscope._optional import require
from lrscope.torch.monitor import TorchMonitor
from lrscope.monitor import checked_every
from lrscope.sinks import Sink, checked

_transformers = require("transformers", "transformers")


class EffectiveLRCallback(_transformers.TrainerCallback):
    """``Trainer(..., callbacks=[EffectiveLRCallback(every=50)])``.

    ``every``: steps between distributions (scalars every step); ``log_dir``, ``sinks``:
    as in ``lrscope.watch``.  ``empirical`` (on by default, unlike ``lrscope.watch``): for an
    optimizer lrscope does not model (``optim="adafactor"`` is transformers' own Adafactor),
    the realized update is measured on the steps with distributions, at the cost of one copy
    of the parameters on each of those steps; a modelled optimizer's update comes from its
    state, without a copy, either way.  ``monitor`` is the TorchMonitor while training runs
    (``monitor.last``: the latest StepReport); ``last`` stays readable after training.

    Under DDP/FSDP (``torchrun``, accelerate) the callback watches on every process and
    process 0 logs the whole model (``distributed``, as in ``lrscope.watch``: False gives
    per-rank reports instead).
    """

    def __init__(self, every: int = 50, *, log_dir: str | os.PathLike | None = None,
                 sinks: Iterable[Sink] | None = None, empirical: bool = True,
                 distributed: bool | None = None):
        self.every = checked_every(every)  # an error now, not when training starts
        self.log_dir = log_dir
        self.sinks = checked(sinks)
        self.empirical = empirical
        self.distributed = distributed
        self.monitor: TorchMonitor | None = None
        self.last = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        self._close()
        log_dir = self.log_dir
        if log_dir is None and not self.sinks:
            log_dir = os.path.join(args.output_dir, "lrscope")
        self.monitor = TorchMonitor(optimizer, model=model, every=self.every, log_dir=log_dir,
                                    sinks=self.sinks, empirical=self.empirical,
                                    distributed=self.distributed)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close()

    def _close(self) -> None:
        if self.monitor is not None:
            self.last = self.monitor.last
            self.monitor.close()
            self.monitor = None
