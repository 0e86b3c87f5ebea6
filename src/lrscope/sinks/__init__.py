"""Where reports go: console, JSONL/CSV, TensorBoard, ... one small module each.

A sink is any object with ``write(report: StepReport) -> None`` and ``close() -> None``;
optionally ``flush()`` (called by ``SinkGroup.flush()``, on its thread) and ``disabled``
(true for a sink that could not start and said so: the group leaves it out).
``SinkGroup`` fans a report out to several sinks and keeps them from stopping training or
each other:

* A sink whose class sets ``background = True`` (the file sinks: JSONL, CSV, TensorBoard;
  trackers talking to a server) gets a thread of its own, fed by a bounded queue: file and
  network I/O never run on the training thread, and a slow or hung sink never holds back
  the others.  Other sinks (the console, your own in-memory sinks) are called inline.
* A sink that raises is disabled with one warning naming it, and its queue is dropped.
* A full disk (``OSError`` ENOSPC, EDQUOT) or a log directory that is gone (ENOENT) is
  waited out instead, with one warning: the sink keeps its reports and tries again (at
  least every ``RETRY_MAX_S``), and writes them once it can.
* When a queue holds ``QUEUE_SIZE`` reports, ``write`` waits for room while that sink
  makes progress (a sink slower than training slows it down rather than lose reports),
  for at most ``STALL_S`` seconds; a sink that made no progress for ``STALL_S`` (hung, or
  waiting out a full disk) has its new reports dropped instead, counted, with one warning.
* ``flush()`` waits for the queues; ``close()`` flushes and closes every sink, and gives
  up on one that makes no progress for ``STALL_S`` seconds (``CLOSE_TIMEOUT_S`` in all),
  with a warning saying how many reports it lost.  Interpreter exit closes, and SIGTERM
  flushes (``_flush_on_sigterm``), a group that was not closed.

>>> import numpy as np
>>> from lrscope.report import Distribution, GroupReport, StepReport
>>> class Collect:
...     def __init__(self): self.steps = []
...     def write(self, report): self.steps.append(report.t)
...     def close(self): pass
>>> group = GroupReport(name="pg0", lr=1e-3, step_size=3e-4,
...                     effective_lr=Distribution.from_array(np.array([1e-4, 3e-4])))
>>> sink = Collect()
>>> sinks = SinkGroup([sink])
>>> for t in (1, 2):
...     sinks.write(StepReport(t=t, optimizer="Adam", framework="torch", family="adam",
...                            groups=[group]))
>>> sinks.close()
>>> sink.steps
[1, 2]
"""

from __future__ import annotations

import atexit
import errno
import os
import queue
import signal
import threading
import time
import weakref
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

from lrscope._warnings import warn
from lrscope.report import StepReport
from lrscope.sinks._files import describe

#: Reports one background sink may have queued.  When its queue is full, ``write`` waits
#: (sinks slower than training slow it down rather than lose data) unless the sink is stuck.
QUEUE_SIZE = 1024
#: Seconds without progress after which a sink counts as stuck: ``write`` drops its reports
#: rather than wait, and ``close()`` gives up on it.
STALL_S = 5.0
#: Seconds ``close()`` and ``flush()`` wait for the background sinks in all.
CLOSE_TIMEOUT_S = 30.0
#: A writer thread wakes at most this often and writes what has queued up since: woken
#: for every report of a fast training loop, it competed with PyTorch's threads (a 0.65 ms
#: step with log_dir took 1.42-1.52 x the unwatched one, 1.22-1.29 x batched; one-off runs).
BATCH_S = 0.05
#: Longest pause between two tries of a sink waiting out a full disk or a missing directory.
RETRY_MAX_S = 1.0
#: The errors a sink waits out (the disk may free up, the directory may be recreated)
#: instead of being disabled.
WAITED_OUT = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.ENOENT)
                       if code is not None)
_STOP, _FLUSH = object(), object()


@runtime_checkable
class Sink(Protocol):
    def write(self, report: StepReport) -> None: ...

    def close(self) -> None: ...


def _failed(sink: Sink, error: BaseException) -> str:
    return (f"lrscope: {describe(sink)} failed ({type(error).__name__}: {error}); it is "
            "disabled for the rest of this run, training and the other sinks continue.")


class _Worker:
    """The thread and queue of one background sink; only this thread calls the sink.

    The training thread (and a SIGTERM handler) only put items into a ``SimpleQueue``, whose
    calls run no Python code that a signal handler could interrupt while holding a lock,
    and read counters.  Holds no reference to its SinkGroup, so ``weakref.finalize`` can
    close it.
    """

    def __init__(self, sink: Sink):
        self.sink = sink
        self.name = describe(sink)
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.pid = os.getpid()
        self.queued = 0  # items put (training thread)
        self.done = 0  # items handled (this thread)
        self.reports_in = 0
        self.reports_out = 0
        self.dropped = 0
        self.progress_at = time.monotonic()  # when the thread last took or handled an item
        self.waiting_out: OSError | None = None  # a full disk or missing directory
        self.stopped = False  # disabled, closing or abandoned: takes no more reports
        self.failed = False  # disabled (warned)
        self.abandoned = threading.Event()
        self.nudge = threading.Event()  # try again now (closing)
        self.thread = threading.Thread(target=self._run, name=f"lrscope-sink {type(sink).__name__}",
                                       daemon=True)
        self.thread.start()

    # -- the training thread's side

    def put(self, report: StepReport) -> None:
        """Queue ``report``; wait a little when the sink lags, drop it when it is stuck."""
        if self.stopped:
            return
        if self.queued - self.done >= QUEUE_SIZE and not self._room():
            self.dropped += 1
            if self.dropped == 1:
                warn(f"lrscope: {self.name} is {QUEUE_SIZE} reports behind and {self._why_stuck()}; "
                     "its reports are dropped until it catches up, training and the other sinks "
                     "continue.")
            return
        self.reports_in += 1
        self._put(report)

    def _put(self, item: object) -> None:
        if self.queued == self.done:  # idle until now: not stuck
            self.progress_at = time.monotonic()
        self.queued += 1
        self.queue.put(item)

    def _room(self) -> bool:
        """Wait for room in the queue while the sink makes progress, STALL_S at most."""
        deadline = time.monotonic() + STALL_S
        while self.queued - self.done >= QUEUE_SIZE:
            if (self.stopped or self.waiting_out is not None or self._stuck()
                    or time.monotonic() > deadline):
                return False
            time.sleep(0.001)
        return True

    def _stuck(self, since: float = 0.0) -> bool:
        """No progress for STALL_S seconds (counted from ``since`` at the earliest)."""
        return time.monotonic() - max(self.progress_at, since) > STALL_S

    def _why_stuck(self) -> str:
        if self.waiting_out is not None:
            return f"cannot write ({type(self.waiting_out).__name__}: {self.waiting_out})"
        return f"made no progress for {STALL_S:g} s (a hung server or disk?)"

    def request_flush(self) -> None:
        if not self.stopped and callable(getattr(self.sink, "flush", None)):
            self._put(_FLUSH)

    def wait(self, since: float, deadline: float) -> bool:
        """Wait until every item queued so far is handled; False if the sink is stuck (no
        progress for STALL_S seconds, counted from ``since`` at the earliest)."""
        target = self.queued
        while self.done < target and self.thread.is_alive() and not self.stopped:
            if self._stuck(since) or time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def stop(self) -> None:
        """Let the thread write what is queued, close the sink and end."""
        self._put(_STOP)
        self.stopped = True
        self.nudge.set()

    def join(self, since: float, deadline: float) -> None:
        """Wait for the thread; abandon the sink, with a warning, if it is stuck (see wait)."""
        while self.thread.is_alive():
            if self._stuck(since) or time.monotonic() > deadline:
                lost = self.dropped + self.reports_in - self.reports_out
                why = (self._why_stuck() if self._stuck(since)
                       else f"did not finish within {CLOSE_TIMEOUT_S:g} s")
                self.abandoned.set()
                self.nudge.set()
                warn(f"lrscope: {self.name} {why}; lrscope stopped waiting for it, "
                     f"and {lost} reports sent to it are lost. Training and the other sinks were "
                     "not held up.")
                return
            self.thread.join(0.01)
        if self.dropped:
            warn(f"lrscope: {self.name} lost {self.dropped} reports, dropped while it lagged behind.")

    # -- the sink's thread

    def _run(self) -> None:
        try:
            while not self.abandoned.is_set():
                batch = [self.queue.get()]
                if batch[0] is not _STOP:
                    time.sleep(BATCH_S)
                    batch += self._queued()
                self.progress_at = time.monotonic()
                for item in batch:
                    if item is _STOP or self.abandoned.is_set() or not self._handle(item):
                        return
                    self.done += 1
                    self.progress_at = time.monotonic()
        finally:
            self._close_sink()

    def _queued(self) -> list[Any]:
        """Everything in the queue now, without waiting."""
        items = []
        while True:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                return items

    def _handle(self, item: Any) -> bool:
        """Write a report (or flush); False once the sink is disabled."""
        pause = 0.05
        while True:
            try:
                if item is _FLUSH:
                    self.sink.flush()  # type: ignore[attr-defined]
                else:
                    self.sink.write(item)
                    self.reports_out += 1
                self.waiting_out = None
                return True
            except Exception as error:  # noqa: BLE001 - a sink must never stop training
                if not (isinstance(error, OSError) and error.errno in WAITED_OUT):
                    self.stopped = self.failed = True
                    warn(_failed(self.sink, error))
                    return False
                if self.waiting_out is None:
                    warn(f"lrscope: {self.name} cannot write for now ({type(error).__name__}: "
                         f"{error}); it keeps its reports (up to {QUEUE_SIZE}) and writes them "
                         "once it can. Training and the other sinks continue.")
                self.waiting_out = error
            if self.nudge.wait(pause):
                self.nudge.clear()
            if self.abandoned.is_set():
                return False
            pause = min(2 * pause, RETRY_MAX_S)

    def _close_sink(self) -> None:
        self.stopped = True
        self.progress_at = time.monotonic()
        try:
            self.sink.close()
        except Exception as error:  # noqa: BLE001
            if not (self.failed or self.abandoned.is_set()):
                warn(_failed(self.sink, error))


def _close_workers(workers: list[_Worker]) -> None:
    """Stop every worker, then wait for them together (abandoning stuck ones)."""
    mine = [w for w in workers if w.pid == os.getpid()]  # not in a forked child
    for worker in mine:
        worker.stop()
    since = time.monotonic()
    for worker in mine:
        worker.join(since, since + CLOSE_TIMEOUT_S)


#: Groups with background sinks, for the SIGTERM handler.
_GROUPS: weakref.WeakSet = weakref.WeakSet()


class SinkGroup:
    """Several sinks behaving as one (see the module docstring)."""

    def __init__(self, sinks: Iterable[Sink]):
        chosen = [s for s in sinks if not getattr(s, "disabled", False)]  # (warned already)
        self._inline = [s for s in chosen if not getattr(s, "background", False)]
        self._workers = [_Worker(s) for s in chosen if getattr(s, "background", False)]
        if self._workers:
            self._finalizer = weakref.finalize(self, _close_workers, self._workers)
            # At interpreter exit, write what is queued before the exit handlers of the
            # libraries the sinks use (registered earlier, so run later) stop them.
            self._finalizer.atexit = False
            atexit.register(self._finalizer)
            _GROUPS.add(self)
            _flush_on_sigterm()

    @property
    def sinks(self) -> list[Sink]:
        """The sinks still enabled."""
        return self._inline + [w.sink for w in self._workers if not w.stopped]

    @property
    def any_enabled(self) -> bool:
        """Whether any sink is still enabled (asked on every step: builds no list)."""
        return bool(self._inline) or bool(self._workers) and any(not w.stopped for w in self._workers)

    def write(self, report: StepReport) -> None:
        for sink in list(self._inline):
            try:
                sink.write(report)
            except Exception as error:  # noqa: BLE001 - a sink must never stop training
                self._drop(sink, error)
        for worker in self._workers:
            worker.put(report)

    def flush(self) -> bool:
        """Block until the background sinks have written every report so far (and flushed,
        those with a ``flush`` method); False if one is stuck (see ``STALL_S``)."""
        live = [w for w in self._workers if not w.stopped and w.pid == os.getpid()]
        for worker in live:
            worker.request_flush()
        since = time.monotonic()
        return all([worker.wait(since, since + CLOSE_TIMEOUT_S) for worker in live])

    def close(self) -> None:
        for sink in list(self._inline):
            try:
                sink.close()
            except Exception as error:  # noqa: BLE001
                self._drop(sink, error)
        self._inline = []
        if self._workers:
            self._finalizer()
            atexit.unregister(self._finalizer)
            _GROUPS.discard(self)

    def _drop(self, sink: Sink, error: Exception) -> None:
        self._inline.remove(sink)
        warn(_failed(sink, error))


_sigterm_pid: int | None = None


def _flush_on_sigterm() -> None:
    """Make SIGTERM (SLURM, Kubernetes, ``docker stop``) write every queued report first.

    Installs a SIGTERM handler once per process, from the main thread, if SIGTERM's handler
    is the default or a Python function; not if SIGTERM is ignored or handled outside
    Python.  The handler flushes every SinkGroup (waiting at most ``STALL_S`` for a stuck
    sink), then calls the handler it replaced, or, if that was the default, ends the process
    by SIGTERM as it would have ended.  A handler installed later replaces it; interpreter
    exit still closes the sinks.
    """
    global _sigterm_pid
    if (_sigterm_pid == os.getpid() or os.name == "nt" or not hasattr(signal, "SIGTERM")
            or threading.current_thread() is not threading.main_thread()):
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN or previous is None:
        return
    try:
        signal.signal(signal.SIGTERM, _flushing(previous, os.getpid()))
    except (ValueError, OSError):  # an interpreter that may not handle signals
        return
    _sigterm_pid = os.getpid()


def _flushing(previous: Callable[..., Any] | int, pid: int) -> Callable[..., Any]:
    def on_sigterm(signum: int, frame: Any) -> Any:
        if os.getpid() == pid:  # (a forked child inherits the handler, not the threads)
            for group in list(_GROUPS):
                group.flush()
        if callable(previous):
            return previous(signum, frame)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return None

    return on_sigterm


def resolve(log_dir: str | os.PathLike | None = None, sinks: Iterable[Sink] | None = None) -> SinkGroup:
    """The sinks a monitor writes to: the defaults for ``log_dir`` (TensorBoard and JSONL),
    if given, and then ``sinks``."""
    chosen = checked(sinks)
    if log_dir is not None:
        from lrscope.sinks.defaults import default_sinks

        chosen = [*default_sinks(log_dir), *chosen]
    return SinkGroup(chosen)


def checked(sinks: Iterable[Sink] | None) -> list[Sink]:
    """``sinks`` as a list, after checking that each is a sink.

    >>> checked(sinks="console")
    Traceback (most recent call last):
    ...
    TypeError: sinks= takes a list of sinks (objects with write(report) and close()), e.g. [lrscope.sinks.ConsoleSink()]; got 'console' (for a directory, pass log_dir=)
    """
    if isinstance(sinks, (str, os.PathLike)) or (sinks is not None and not isinstance(sinks, Iterable)):
        raise TypeError(_not_sinks(sinks))
    chosen = list(sinks or [])
    for sink in chosen:
        if not (callable(getattr(sink, "write", None)) and callable(getattr(sink, "close", None))):
            raise TypeError(_not_sinks(sink))
    return chosen


def _not_sinks(given: object) -> str:
    return ("sinks= takes a list of sinks (objects with write(report) and close()), e.g. "
            f"[lrscope.sinks.ConsoleSink()]; got {given!r} (for a directory, pass log_dir=)")


# The sinks themselves (none of them imports its library before it is used).
from lrscope.sinks.console import ConsoleSink  # noqa: E402
from lrscope.sinks.csv import CsvSink  # noqa: E402
from lrscope.sinks.jsonl import JsonlSink  # noqa: E402
from lrscope.sinks.tensorboard import TensorBoardSink  # noqa: E402
from lrscope.sinks.mlflow import MlflowSink  # noqa: E402
from lrscope.sinks.trackio import TrackioSink  # noqa: E402
from lrscope.sinks.wandb import WandbSink  # noqa: E402

__all__ = ["ConsoleSink", "CsvSink", "JsonlSink", "MlflowSink", "Sink", "SinkGroup", "TensorBoardSink",
           "TrackioSink", "WandbSink", "checked", "resolve"]
