"""Monitor: what ``lrscope.watch`` returns, common to every framework.

A framework's monitor attaches to its optimizer, builds a StepReport for each step and
hands it to ``_emit``; this base keeps the latest report in ``last`` and writes it to
the sinks.  ``close()`` detaches and flushes; monitors are context managers.
"""

from __future__ import annotations

import os
from typing import Iterable

from lrscope.report import StepReport
from lrscope.sinks import Sink, resolve


class Monitor:
    """Holds the sinks and the latest report; subclasses attach to an optimizer."""

    def __init__(self, *, every: int = 1, log_dir: str | os.PathLike | None = None,
                 sinks: Iterable[Sink] | None = None):
        if int(every) < 1:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        self.every = int(every)
        self._last: StepReport | None = None
        self._sinks = resolve(log_dir, sinks)
        self._closed = False

    def wants_distributions(self, t: int) -> bool:
        """Distributions are computed on steps 1, 1 + every, 1 + 2*every, ..."""
        return (t - 1) % self.every == 0

    @property
    def last(self) -> StepReport | None:
        """The StepReport of the latest step (None before the first)."""
        return self._last

    @property
    def has_sinks(self) -> bool:
        return bool(self._sinks.sinks)

    def _emit(self, report: StepReport) -> None:
        self._last = report
        self._sinks.write(report)

    def _detach(self) -> None:
        """Remove hooks from the optimizer (framework monitors override this)."""

    def close(self) -> None:
        """Detach from the optimizer and flush and close every sink (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._detach()
        self._sinks.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
