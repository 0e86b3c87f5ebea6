"""Where reports go: console, JSONL/CSV, TensorBoard, ... one small module each.

A sink is any object with ``write(report: StepReport) -> None`` and ``close() -> None``.
``SinkGroup`` fans a report out to several sinks and isolates their failures: a sink
that raises is disabled with one warning and the others keep working, so logging can
never stop training.
"""

from __future__ import annotations

import os
import warnings
from typing import Iterable, Protocol, runtime_checkable

from lrscope.report import StepReport


@runtime_checkable
class Sink(Protocol):
    def write(self, report: StepReport) -> None: ...

    def close(self) -> None: ...


class SinkGroup:
    """Several sinks behaving as one; a failing sink is dropped with a warning."""

    def __init__(self, sinks: Iterable[Sink]):
        self.sinks = list(sinks)

    def write(self, report: StepReport) -> None:
        for sink in list(self.sinks):
            try:
                sink.write(report)
            except Exception as error:  # noqa: BLE001 - a sink must never stop training
                self._drop(sink, error)

    def close(self) -> None:
        for sink in list(self.sinks):
            try:
                sink.close()
            except Exception as error:  # noqa: BLE001
                self._drop(sink, error)
        self.sinks = []

    def _drop(self, sink: Sink, error: Exception) -> None:
        self.sinks.remove(sink)
        warnings.warn(
            f"lrscope: {type(sink).__name__} failed ({type(error).__name__}: {error}); it is "
            "disabled for the rest of this run, training and the other sinks continue.",
            RuntimeWarning,
            stacklevel=3,
        )


def resolve(log_dir: str | os.PathLike | None = None, sinks: Iterable[Sink] | None = None) -> SinkGroup:
    """The sinks a monitor writes to: ``sinks`` as given, else the defaults for ``log_dir``."""
    chosen = list(sinks or [])
    if log_dir is not None and not chosen:
        from lrscope.sinks.defaults import default_sinks

        chosen = default_sinks(log_dir)
    return SinkGroup(chosen)
