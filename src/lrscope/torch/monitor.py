"""``TorchMonitor``: lrscope attached to a torch optimizer through its step hooks.

The pre-hook records what the step is about to use (each group's lr, Adadelta's
accumulated deltas, ASGD's eta, or a parameter snapshot in empirical mode); the
post-hook builds the StepReport of the step just taken with ``TorchReader``.
``inspect`` reads the current state alone and notes what it cannot know.
"""

from __future__ import annotations

import os
import sys
import weakref
from functools import partial
from typing import Any, Callable, Iterable, Iterator

import torch

from lrscope.findings.schedule_rules import SCHEDULER_BEFORE_OPTIMIZER
from lrscope.formulas import Elementwise
from lrscope.monitor import Monitor
from lrscope.report import StepReport, tag_prefix
from lrscope.sinks import Sink
from lrscope.torch import stats
from lrscope.torch.distributed import Ranks, active, fsdp1_shard, partitioned
from lrscope.torch.optimizers import group_name
from lrscope.torch.reader import SKIPPED_NOTE, TorchReader, _Pending
from lrscope.torch.state import RECORD_REQUIRED, as_float
from lrscope._warnings import warn

#: The monitors attached to each optimizer: a notebook cell run again attaches one more.
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class TorchMonitor(Monitor):
    """Monitor attached to a torch optimizer through step pre/post hooks."""

    def __init__(self, optimizer: Any, *, model: Any = None, every: int = 1,
                 log_dir: str | os.PathLike | None = None, sinks: Iterable[Sink] | None = None,
                 empirical: bool = False, grad_scaler: Any = None, name: str | None = None,
                 findings: bool = True, distributed: bool | None = None):
        _check_options(model, grad_scaler)  # before any hook, thread or log exists
        reader = TorchReader(optimizer, model=model, empirical=empirical, warn=warn)  # before any log is opened
        if not hasattr(reader.optimizer, "_optimizer_step_pre_hooks"):
            raise TypeError(_without_hooks(reader.optimizer))
        # Several processes: rank 0 reports (and logs) the whole model, the others measure
        # their part for it and write nothing (lrscope.torch.distributed).
        merging = active(distributed)
        if merging and reader.fragments is None and any(fsdp1_shard(p) for g in reader.optimizer.param_groups
                                                        for p in g["params"]):
            warn("lrscope: FSDP1 (FullyShardedDataParallel) parameters without model=: each rank reports its "
                 "own shards (lrscope merge adds per-rank logs up); pass model= (the wrapped model) for "
                 "the whole model's report on rank 0")
            merging = False
        self._ranks = Ranks(every=every, partitioned=partitioned(optimizer)) if merging else None
        reader.merging = self._ranks is not None
        if self._ranks is not None and self._ranks.rank != 0:
            log_dir, sinks, findings = None, None, False
        super().__init__(every=every, log_dir=log_dir, sinks=sinks, name=name, findings=findings)
        self.reader = reader
        if self.reader.notes:
            warn("lrscope: " + self.reader.notes[0])
        self._pending: _Pending | None = None
        self._lazy: tuple[_Pending | None, int] | None = None
        self._t = self._reported_t = self.reader._step_count()
        self._stepped = False
        self._warned_capture = False
        # Whether the step running is being captured into a CUDA graph: asked once per step,
        # by the pre-hook (on a GPU machine each ask is CUDA runtime calls).
        self._captured = False
        self._depth = 0  # step() calls running: a subclass's step may call its parent's
        opt = self.reader.optimizer
        # Each group's lr as its scheduler set it, judged at the first step (findings).
        self._schedule_start = _schedule_start(opt) if self._t == 0 and findings else None
        # A compiled optimizer.step() (torch.compile) runs the hooks as they are, untraced.
        self._handles = [opt.register_step_pre_hook(_untraced(self._before)),
                         opt.register_step_post_hook(_untraced(self._after))]
        attached = _ATTACHED.setdefault(opt, weakref.WeakSet())
        if attached:
            warn(f"lrscope: this optimizer already has {len(attached)} monitor(s) attached (a notebook "
                 "cell run again?): each reports and logs every step; close the ones you do not "
                 "want with monitor.close()")
        attached.add(self)
        self._scaler = grad_scaler
        self._scaler_update = None
        if grad_scaler is not None:
            self._scaler_update = grad_scaler.update
            grad_scaler.update = self._scaler_updated  # restored by close()

    def _before(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._captured = _capturing()
        if self._captured:
            return
        if self._depth and _nested_step(optimizer):
            self._depth += 1  # the outer call is the step: its hooks measure it
            return
        self._depth = 1  # (also after a step() that raised, leaving the count up)
        t_next = self._t + 1
        if self._schedule_start is not None:
            self._check_schedule_start(optimizer)
        self._pending = self.guarded(partial(self.reader.begin, t_next), self.wants_distributions(t_next),
                                     fallback=_nothing_pending)

    def _check_schedule_start(self, optimizer: Any) -> None:
        """The scheduler_stepped_before_optimizer finding: a group whose first step uses an
        lr other than the one its scheduler set when it was created (lrscope.findings)."""
        start, self._schedule_start = self._schedule_start, None
        try:
            prefix = tag_prefix(type(optimizer).__name__, self.name)
            for index, (group, lr) in enumerate(zip(optimizer.param_groups, start or [])):
                used = as_float(group["lr"])
                if lr is not None and self._findings is not None and used != lr:
                    self._findings.found(
                        SCHEDULER_BEFORE_OPTIMIZER, f"{prefix}/{group_name(group, index)}", 1,
                        f"step 1 used lr {used:.4g}, but the schedule starts at {lr:.4g} (the lr "
                        "when watch() attached): its first value was skipped")
        except Exception:  # noqa: BLE001 - a finding is never worth stopping training
            pass

    def _after(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._captured:  # (asked by the pre-hook of this step)
            # Measuring here would put a host read into the graph (capture fails), and
            # the graph's replays run no hooks: nothing to count either.
            if not self._warned_capture:
                self._warned_capture = True
                warn("lrscope: optimizer.step() is being captured into a CUDA graph; the graph's "
                     "replays run no Python hooks, so this monitor does not see them. Call "
                     "lrscope.inspect(optimizer) after a replay: it reads the state the replays "
                     "left (t included)")
            return
        if self._depth > 1:  # the end of a parent class's step() inside the step
            self._depth -= 1
            return
        self._depth = 0
        self._stepped = True
        pending, self._pending = self._pending, None
        found_inf = getattr(optimizer, "found_inf", None)  # set by GradScaler for fused steps
        if isinstance(found_inf, torch.Tensor) and stats.on_host(found_inf.device):
            if found_inf.item():  # the step skipped itself; read for free on the CPU
                self._emit_skipped(pending)
                return
            found_inf = None
        self._t += 1
        distributions = self.wants_distributions(self._t)
        if self.reader.wrapped is not None:  # its step goes on after this hook: ckp1 is read now
            self.reader.end(pending)
        if distributions or self.has_sinks:
            # (A device flag is read only with the statistics, in their one transfer.)
            report = self.guarded(partial(self.reader.report, pending, t=self._t, found_inf=found_inf,
                                          stepping=True),
                                  distributions, fallback=partial(self.reader.fallback, pending, self._t))
            self._t = report.t  # a measured step re-syncs with the state's counters
            if distributions and self._ranks is not None:
                report = self._whole(report)
            self._emit(report)
        else:
            # Nobody reads this step's scalars yet: keep what they need (the lr and options
            # the step used, recorded by the pre-hook) and build the report on access.
            self._lazy = (pending, self._t)

    def _whole(self, report: StepReport) -> StepReport:
        """On rank 0 the whole model's report of this measured step, merged from every rank's
        part; on the others this rank's own.  If the ranks cannot meet (one of them stopped
        watching, or stepped a different number of times), one warning and per-rank reports
        from then on: a monitor never hangs or stops training."""
        try:
            return self._ranks.merge(report, complete=not self._failed) or report
        except Exception as error:  # noqa: BLE001 - a monitor must never stop training
            warn(f"lrscope: merging the ranks' reports failed ({error}); from now on each rank "
                 "reports its own tensors and shards")
            self._ranks = None
            self.reader.merging = False
            return report

    def _emit(self, report: StepReport) -> None:
        self._lazy = None
        super()._emit(report)

    @property
    def last(self) -> StepReport | None:
        if self._lazy is not None:
            pending, t = self._lazy
            self._lazy = None
            self._last = self._named(self.guarded(partial(self.reader.report, pending, t=t), False,
                                                  fallback=partial(self.reader.fallback, pending, t)))
        return self._last

    def _scaler_updated(self, *args: Any, **kwargs: Any) -> Any:
        if not self._stepped:
            # GradScaler found inf/NaN gradients and skipped optimizer.step().
            self._emit_skipped(_Pending(lrs=[g["lr"] for g in self.reader.optimizer.param_groups]))
        self._stepped = False
        return self._scaler_update(*args, **kwargs)

    def _emit_skipped(self, pending: _Pending | None) -> None:
        """Report a step GradScaler skipped: scalars only, t unchanged."""
        report = self.guarded(partial(self.reader.report, pending, t=self._t), False,
                              fallback=partial(self.reader.fallback, pending, self._t))
        report.skipped = True
        report.notes.append(SKIPPED_NOTE)
        self._emit(report)

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        _ATTACHED.get(self.reader.optimizer, set()).discard(self)
        if self._scaler is not None:
            self._scaler.update = self._scaler_update


def _schedule_start(optimizer: Any) -> list[float | None] | None:
    """Each group's lr where a torch LR scheduler has set ``initial_lr`` (None elsewhere), if
    the optimizer has not stepped yet (the scheduler's step wrapper sets ``_opt_called``)."""
    if getattr(optimizer, "_opt_called", False):
        return None
    lrs = [as_float(g["lr"]) if "initial_lr" in g else None for g in optimizer.param_groups]
    return lrs if any(lr is not None for lr in lrs) else None


def _check_options(model: Any, grad_scaler: Any) -> None:
    """TypeError for a ``model=`` or ``grad_scaler=`` that is not one.

    >>> _check_options(model=None, grad_scaler=5)
    Traceback (most recent call last):
    ...
    TypeError: grad_scaler= takes the torch.amp.GradScaler that scales this optimizer's steps (so that the steps it skips are reported as skipped), got 5
    """
    if model is not None and not callable(getattr(model, "named_parameters", None)):
        raise TypeError("model= takes the torch.nn.Module whose parameters the optimizer updates "
                        f"(its names label the tensors in the reports), got {model!r}")
    if grad_scaler is not None and not (callable(getattr(grad_scaler, "update", None))
                                        and callable(getattr(grad_scaler, "step", None))):
        raise TypeError("grad_scaler= takes the torch.amp.GradScaler that scales this optimizer's "
                        "steps (so that the steps it skips are reported as skipped), got "
                        f"{grad_scaler!r}")


def _step_wrapper_code() -> Any:
    """The code of the wrapper torch puts around each Optimizer class's ``step`` to run the
    step hooks (None if this torch has none)."""
    try:
        return torch.optim.Optimizer.profile_hook_step(lambda *args: None).__code__
    except Exception:  # noqa: BLE001 - then no step is taken for nested
        return None


_STEP_WRAPPER = _step_wrapper_code()


def _nested_step(optimizer: Any) -> bool:
    """Whether a step of ``optimizer`` is running around this one: a subclass's ``step()``
    calling its parent's (torch wraps both, and runs the hooks in each); not a count left up
    by a ``step()`` that raised.  Walks the stack only when the count is up."""
    frame, found = sys._getframe(1), 0
    while frame is not None:
        if frame.f_code is _STEP_WRAPPER and frame.f_locals.get("self") is optimizer:
            found += 1
            if found > 1:
                return True
        frame = frame.f_back
    return False


def _untraced(hook: Callable[[Any, Any, Any], None]) -> Callable[[Any, Any, Any], None]:
    """``hook`` as a step hook that dynamo never traces: through ``torch.compiler.disable``
    while it compiles the step (a graph break, then the hook runs as it is), called directly
    otherwise (the disabling wrapper's eval-frame switches cost a few microseconds per call
    inside a step, measured 2-4 us per hook on the CPU, and the hooks run on every step)."""
    disabled = torch.compiler.disable(hook)

    def step_hook(optimizer: Any, args: Any, kwargs: Any) -> None:
        if torch.compiler.is_compiling():
            return disabled(optimizer, args, kwargs)
        return hook(optimizer, args, kwargs)

    return step_hook


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (never without CUDA in use)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _nothing_pending(error: Exception) -> None:
    """The pre-hook's fallback: nothing recorded (the report then reads the groups after the step)."""
    return None


def _without_hooks(optimizer: torch.optim.Optimizer) -> str:
    """What to do with an Optimizer subclass whose ``__init__`` skipped ``Optimizer.__init__``
    (torch_optimizer's Lookahead): its ``step()`` runs no step hooks, so it cannot be watched."""
    what = type(optimizer).__name__
    inner = getattr(optimizer, "optimizer", None)
    todo = (f"watch the optimizer it wraps, lrscope.watch(optimizer.optimizer) (its {what} updates "
            "on top of that are then not in the reports), or " if isinstance(inner, torch.optim.Optimizer)
            else "")
    return (f"{what} subclasses torch.optim.Optimizer without calling Optimizer.__init__, so its "
            f"step() runs no step hooks and lrscope.watch cannot follow it: {todo}call "
            "lrscope.inspect(optimizer) after each step() (scheduled lr only for an optimizer "
            "lrscope does not model)")


def inspect(optimizer: Any, *, model: Any = None, distributions: bool = True) -> StepReport:
    """StepReport of the last step from the optimizer's state alone (see lrscope.inspect)."""
    _check_options(model, None)
    return TorchReader(optimizer, model=model).report(None, distributions)


def watch(optimizer: Any, **options: Any) -> TorchMonitor:
    """TorchMonitor on ``optimizer`` (see lrscope.watch and TorchMonitor)."""
    return TorchMonitor(optimizer, **options)


def elementwise(optimizer: Any, model: Any = None) -> Iterator[tuple[str, Elementwise]]:
    """``(name, Elementwise)`` of every parameter the last step moved (for debugging and tests).

    Reads the state the step left and the lr now in the param groups: call it right after
    ``step()``, before a scheduler steps.  Adafactor's scale, the RMS of theta *before* the
    step, is recovered from theta after it (exact up to rounding; ``watch()`` records it).
    Adadelta's eta reads state the step overwrote: ValueError (``watch()`` records it in its
    pre-hook, and its reports carry the distributions).
    """
    reader = TorchReader(optimizer, model=model)
    if reader.family in RECORD_REQUIRED:
        raise ValueError(f"{type(reader.optimizer).__name__}'s eta reads its state from before the step, "
                         "which step() overwrote, so elementwise() cannot compute it afterwards; "
                         "lrscope.watch(optimizer) records it in its pre-hook and reports the distributions")
    yield from reader.elementwise()
