"""Where reports go: console, JSONL/CSV, TensorBoard, ... one small module each.

A sink is any object with ``write(report: StepReport) -> None`` and ``close() -> None``.
``SinkGroup`` fans a report out to several sinks and isolates their failures: a sink
that raises is disabled with one warning and the others keep working, so logging can
never stop training.

A sink whose class sets ``background = True`` (the file sinks: JSONL, CSV, TensorBoard)
is written from one worker thread fed by a bounded queue, so file I/O, a slow disk or a
hung network filesystem never runs on the training thread.  When that queue is full,
``write`` waits for room (sinks slower than training slow it down rather than lose
reports) for at most ``STALL_S`` seconds; after that, reports are dropped with one
warning until the sinks catch up.  Other sinks (the console, your own in-memory sinks)
are called inline, in step order.  ``flush()`` waits for the queue; ``close()`` flushes
and closes everything, and runs by itself at interpreter exit.

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
import os
import queue
import threading
import time
import weakref
from typing import Iterable, Protocol, runtime_checkable

from lrscope._warnings import warn
from lrscope.report import StepReport

#: Reports waiting for the background sinks.  When the queue is full, ``write`` waits (sinks
#: slower than training slow it down rather than lose data) unless the sinks are stuck.
QUEUE_SIZE = 1024
#: Seconds a full queue may block the training thread before reports are dropped instead.
STALL_S = 5.0
#: Seconds ``close()`` waits for the background sinks to drain before giving up.
CLOSE_TIMEOUT_S = 30.0
#: The writer thread wakes at most this often and writes what has queued up since: woken
#: for every report of a fast training loop, it competed with PyTorch's threads (a 0.65 ms
#: step with log_dir took 1.42-1.52 x the unwatched one, 1.22-1.29 x batched; one-off runs).
BATCH_S = 0.05
_STOP = object()


@runtime_checkable
class Sink(Protocol):
    def write(self, report: StepReport) -> None: ...

    def close(self) -> None: ...


def _warn(sink: Sink, error: BaseException) -> None:
    warn(f"lrscope: {type(sink).__name__} failed ({type(error).__name__}: {error}); it is "
         "disabled for the rest of this run, training and the other sinks continue.")


class _Worker:
    """One thread writing reports to the background sinks, in order.

    Holds no reference to its SinkGroup, so ``weakref.finalize`` can shut it down at
    interpreter exit.
    """

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks
        self.queue: queue.Queue = queue.Queue(QUEUE_SIZE)
        self.dropped = 0
        self.stalled = False
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="lrscope-sinks", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            batch = [self.queue.get()]
            if batch[0] is not _STOP:
                time.sleep(BATCH_S)
                batch += self._queued()
            try:
                for item in batch:
                    if item is _STOP:
                        return
                    self._write(item)
            finally:
                for _ in batch:
                    self.queue.task_done()

    def _queued(self) -> list[StepReport]:
        """Everything in the queue now, without waiting."""
        items = []
        while True:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                return items

    def _write(self, report: StepReport) -> None:
        for sink in list(self.sinks):
            try:
                sink.write(report)
            except Exception as error:  # noqa: BLE001 - a sink must never stop training
                self.sinks.remove(sink)
                _warn(sink, error)

    def put(self, report: StepReport) -> None:
        """Queue ``report``; wait a little when the sinks lag, drop it when they seem stuck."""
        if self.stalled and self.queue.qsize() < QUEUE_SIZE // 2:
            self.stalled = False
        try:
            self.queue.put(report, timeout=STALL_S if not self.stalled else 0.0)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                warn(f"lrscope: the file sinks are {QUEUE_SIZE} reports behind and made no "
                     f"progress for {STALL_S:.0f} s (stuck disk?); reports are dropped until they "
                     "catch up, training continues.")
            self.stalled = True

    def flush(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """Wait until every queued report is written; False on timeout."""
        with self.queue.all_tasks_done:
            return self.queue.all_tasks_done.wait_for(lambda: not self.queue.unfinished_tasks,
                                                      timeout)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        try:
            self.queue.put(_STOP, timeout=CLOSE_TIMEOUT_S)
        except queue.Full:
            pass
        self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive():
            warn(f"lrscope: the file sinks did not finish within {CLOSE_TIMEOUT_S:.0f} s "
                 "(stuck disk?); the last reports may be missing.")
            return
        for sink in list(self.sinks):
            try:
                sink.close()
            except Exception as error:  # noqa: BLE001
                _warn(sink, error)
        self.sinks.clear()


class SinkGroup:
    """Several sinks behaving as one; a failing sink is dropped with a warning."""

    def __init__(self, sinks: Iterable[Sink]):
        chosen = list(sinks)
        self._inline = [s for s in chosen if not getattr(s, "background", False)]
        background = [s for s in chosen if getattr(s, "background", False)]
        self._worker = _Worker(background) if background else None
        if self._worker is not None:
            self._finalizer = weakref.finalize(self, self._worker.close)
            # At interpreter exit, drain the queue before the exit handlers of the libraries
            # the sinks use (registered earlier, so run later) close their writers and queues.
            self._finalizer.atexit = False
            atexit.register(self._worker.close)

    @property
    def sinks(self) -> list[Sink]:
        """The sinks still enabled."""
        return self._inline + (self._worker.sinks if self._worker is not None else [])

    def write(self, report: StepReport) -> None:
        for sink in list(self._inline):
            try:
                sink.write(report)
            except Exception as error:  # noqa: BLE001 - a sink must never stop training
                self._drop(sink, error)
        if self._worker is not None and not self._worker.closed:
            self._worker.put(report)

    def flush(self) -> None:
        """Block until the background sinks have written every report so far."""
        if self._worker is not None and not self._worker.closed:
            self._worker.flush()

    def close(self) -> None:
        for sink in list(self._inline):
            try:
                sink.close()
            except Exception as error:  # noqa: BLE001
                self._drop(sink, error)
        self._inline = []
        if self._worker is not None:
            self._finalizer()
            atexit.unregister(self._worker.close)

    def _drop(self, sink: Sink, error: Exception) -> None:
        self._inline.remove(sink)
        _warn(sink, error)


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

__all__ = ["ConsoleSink", "CsvSink", "JsonlSink", "Sink", "SinkGroup", "TensorBoardSink", "checked", "resolve"]
