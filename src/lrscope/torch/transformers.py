"""``EffectiveLRCallback``: a Hugging Face ``Trainer`` callback watching the Trainer's optimizer.

When training begins it attaches ``lrscope.watch`` to the optimizer the Trainer built (the
``AcceleratedOptimizer`` around it is seen through), with the model for the tensors' names,
on the main process only; it closes the monitor when training ends.  Without ``log_dir``
or ``sinks`` the reports go to ``<output_dir>/lrscope`` (TensorBoard event files and
``lrscope.jsonl``), beside the Trainer's own TensorBoard runs under ``<output_dir>/runs``.

The scalars also go into the Trainer's own trackers (``TrainingArguments(report_to=...)``),
at the optimizer step t, which is the Trainer's ``global_step`` (both count optimizer steps,
gradient accumulation and resumed runs included), as what TensorBoard receives:

* ``"tensorboard"``: lrscope's event files into the Trainer's TensorBoard run directory
  (one run in TensorBoard: the Trainer's ``train/...`` tags beside lrscope's ``lr-...``);
* ``"wandb"``: the Trainer's W&B run (``WandbSink``);
* ``"mlflow"``: the Trainer's MLflow run (``MlflowSink``);
* ``"trackio"``: the Trainer's trackio run (``TrackioSink``).

Those trackers end their runs in their ``on_train_end``, which the Trainer calls before
this callback's: the callback therefore closes its monitor (writing every report) at the
end of the last step, ``max_steps``.  (A run stopped earlier, by an early-stopping
callback, is closed in ``on_train_end``: a tracker that refuses writes to a finished run,
trackio, may then miss the reports still queued.)

Other trackers of ``report_to`` (Comet, Neptune, ClearML, ...) are not written to; lrscope's
own sinks are.  ``report_to=False`` on the callback leaves the Trainer's trackers out.
transformers hands a callback no handle on the others: the callback finds the Trainer's
tracker callbacks through the ``CallbackHandler`` calling its ``on_train_begin``.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable

from lrscope._optional import require
from lrscope._warnings import warn
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
                 distributed: bool | None = None, report_to: bool = True):
        self.report_to = report_to
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
        trackers = (_tracker_sinks(_trainer_callbacks())
                    if self.report_to and state.is_world_process_zero else [])
        self.monitor = TorchMonitor(optimizer, model=model, every=self.every, log_dir=log_dir,
                                    sinks=[*self.sinks, *trackers], empirical=self.empirical,
                                    distributed=self.distributed)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.max_steps and state.global_step >= state.max_steps:
            self._close()  # (before the trackers' on_train_end ends their runs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close()

    def _close(self) -> None:
        if self.monitor is not None:
            self.last = self.monitor.last
            self.monitor.close()
            self.monitor = None


def _trainer_callbacks() -> list[Any]:
    """The callbacks of the Trainer whose ``CallbackHandler`` is calling the caller (a few
    frames up), or [] when there is none."""
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            break
        handler = frame.f_locals.get("self")
        if isinstance(handler, _transformers.trainer_callback.CallbackHandler):
            return list(handler.callbacks)
        frame = frame.f_back
    return []


def _tracker_sinks(callbacks: list[Any]) -> list[Sink]:
    """lrscope sinks writing into the runs of the Trainer's tracker callbacks that have one;
    one that cannot be made costs a warning, never the training."""
    sinks: list[Sink] = []
    for callback in callbacks:
        try:
            sink = _tracker_sink(callback)
        except Exception as error:  # noqa: BLE001 - a tracker is never worth stopping training
            warn(f"lrscope: cannot write into the Trainer's {type(callback).__name__} "
                 f"({type(error).__name__}: {error}); lrscope's other sinks continue.")
            continue
        if sink is not None:
            sinks.append(sink)
    return sinks


def _tracker_sink(callback: Any) -> Sink | None:
    """The lrscope sink for one of the Trainer's callbacks, or None if it is no tracker
    lrscope writes to (or has no run)."""
    from transformers.integrations import integration_utils as hf

    if isinstance(callback, hf.TensorBoardCallback) and getattr(callback, "tb_writer", None) is not None:
        from lrscope.sinks.tensorboard import TensorBoardSink

        writer = callback.tb_writer  # (its directory: torch's log_dir, tensorboardX's logdir)
        directory = getattr(writer, "log_dir", None) or getattr(writer, "logdir", None) or callback.logging_dir
        return TensorBoardSink(directory) if directory else TensorBoardSink(writer=writer)
    if (isinstance(callback, hf.WandbCallback) and getattr(callback, "_initialized", False)
            and callback._wandb is not None and callback._wandb.run is not None):
        from lrscope.sinks.wandb import WandbSink

        return WandbSink(run=callback._wandb.run)
    if (isinstance(callback, hf.MLflowCallback) and getattr(callback, "_initialized", False)
            and callback._ml_flow.active_run() is not None):
        from lrscope.sinks.mlflow import MlflowSink

        return MlflowSink(run_id=callback._ml_flow.active_run().info.run_id)
    if (isinstance(callback, getattr(hf, "TrackioCallback", ())) and getattr(callback, "_initialized", False)
            and callback._trackio.context_vars.current_run.get() is not None):
        from lrscope.sinks.trackio import TrackioSink

        return TrackioSink(run=callback._trackio.context_vars.current_run.get())
    return None
