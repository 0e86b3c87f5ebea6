"""Monitor: what ``lrscope.watch`` returns, common to every framework.

A framework's monitor attaches to its optimizer, builds a StepReport for each step and
hands it to ``_emit``; this base keeps the latest report in ``last``, checks it for
findings (``lrscope.findings``: ``findings=True``, the default; they are in ``findings``
and, where new, in ``report.findings``) and writes it to the sinks.  ``close()`` detaches
and flushes; monitors are context managers.

A monitor must never stop training: if measuring the distributions raises (a tensor type
or a framework release lrscope does not know), ``guarded`` warns once and the monitor
reports scalars only from then on; if the scalars raise too, it warns once and reports what
it can without them (NaN where unknown).  ``lrscope.inspect`` still raises, with the traceback.
"""

from __future__ import annotations

import numbers
import os
from typing import Callable, Iterable, TypeVar

from lrscope._warnings import warn
from lrscope.findings.core import Finding
from lrscope.findings.live import LiveFindings
from lrscope.report import GroupReport, StepReport
from lrscope.sinks import Sink, resolve

T = TypeVar("T")


def checked_every(every: int) -> int:
    """``every`` as an int, if it is a whole number of steps >= 1 (numpy ints included).

    >>> checked_every(2.5)
    Traceback (most recent call last):
    ...
    ValueError: every must be a positive whole number of steps, got 2.5
    """
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise ValueError(f"every must be a positive whole number of steps, got {every!r}")
    return int(every)


def unmeasured(t: int, optimizer: str, framework: str, family: str | None,
               error: Exception) -> StepReport:
    """The report of step ``t`` when measuring it raised ``error`` (a ``guarded`` fallback):
    one group, every scalar unknown (NaN).

    >>> report = unmeasured(3, "Adam", "keras", "adam", ValueError("bad"))
    >>> report.t, report.scalars(), report.notes
    (3, {}, ['measuring this step failed (ValueError: bad): everything but t unknown'])
    """
    return StepReport(t=t, optimizer=optimizer, framework=framework, family=family,
                      groups=[GroupReport(name="pg0")],
                      notes=[f"measuring this step failed ({type(error).__name__}: {error}): "
                             "everything but t unknown"])


class Monitor:
    """Holds the sinks and the latest report; subclasses attach to an optimizer."""

    def __init__(self, *, every: int = 1, log_dir: str | os.PathLike | None = None,
                 sinks: Iterable[Sink] | None = None, name: str | None = None,
                 findings: bool = True):
        every = checked_every(every)
        if name is not None and (not isinstance(name, str) or not name or "/" in name):
            raise ValueError(f"name must be a non-empty string without '/' (it becomes the tag "
                             f"prefix lr-<name>), got {name!r}")
        self.every = every
        self.name = name
        self._last: StepReport | None = None
        self._sinks = resolve(log_dir, sinks)
        # What is wrong with the run, from each report (lrscope.findings); None: not checked.
        self._findings = LiveFindings() if findings else None
        self._closed = False
        self._failed = False  # measuring distributions raised: scalars only from then on
        self._scalars_failed = False  # measuring the scalars raised once (warned)
        #: t of the latest report, or of the optimizer when the monitor attached (subclasses
        #: that know it set it); None: unknown.
        self._reported_t: int | None = None

    def wants_distributions(self, t: int) -> bool:
        """Distributions are computed on steps 1, 1 + every, 1 + 2*every, ...: on a report
        when such a step lies between the previous report and this one, so that a report
        covering several steps (Keras' ``steps_per_execution``: one callback per N steps)
        still measures on schedule; with a report per step, that is t itself.  None after
        measuring them failed (see ``guarded``).

        >>> monitor = Monitor(every=10, sinks=[])
        >>> [t for t in range(1, 25) if monitor.wants_distributions(t)]
        [1, 11, 21]
        >>> monitor._reported_t = 8  # the previous report was at step 8; this one at 12
        >>> monitor.wants_distributions(12)
        True
        """
        if self._failed:
            return False
        return (t - 1) // self.every > (self.previous_t(t) - 1) // self.every

    def previous_t(self, t: int) -> int:
        """t of the previous report, or ``t - 1`` when unknown or not below ``t`` (a
        checkpoint took t back)."""
        previous = self._reported_t
        return t - 1 if previous is None or previous >= t else previous

    def guarded(self, work: Callable[[bool], T], distributions: bool, *,
                fallback: Callable[[Exception], T]) -> T:
        """``work(distributions)``, never raising: monitors run inside the user's step.

        If measuring the distributions raises, one warning, then ``work(False)`` now and no
        distributions from then on.  If the scalars-only ``work(False)`` raises too, one
        warning (the first time) and ``fallback(error)``, which must not raise: what can be
        reported without them (NaN where unknown).  The scalars are tried again next step.
        """
        if distributions and not self._failed:
            try:
                return work(True)
            except Exception as error:  # noqa: BLE001 - a monitor must never stop training
                self._failed = True
                warn(f"lrscope: measuring the distributions failed ({type(error).__name__}: {error}); "
                     "from now on only the scalars are reported, and training continues. "
                     "lrscope.inspect(...) raises the error with its traceback: please report it.")
        try:
            return work(False)
        except Exception as error:  # noqa: BLE001 - a monitor must never stop training
            if not self._scalars_failed:
                self._scalars_failed = True
                warn(f"lrscope: measuring the scalars failed ({type(error).__name__}: {error}); such "
                     "steps are reported with what could be read (NaN where unknown), and training "
                     "continues. lrscope.inspect(...) raises the error with its traceback: please "
                     "report it.")
            return fallback(error)

    @property
    def last(self) -> StepReport | None:
        """The StepReport of the latest step (None before the first)."""
        return self._last

    @property
    def findings(self) -> list[Finding]:
        """Every finding so far (``lrscope.findings``): empty with ``findings=False``."""
        return [] if self._findings is None else self._findings.findings

    @property
    def has_sinks(self) -> bool:
        return self._sinks.any_enabled

    def _named(self, report: StepReport) -> StepReport:
        """``report`` with this monitor's name, if it was given one."""
        if self.name is not None:
            report.name = self.name
        return report

    def _emit(self, report: StepReport) -> None:
        self._last = self._named(report)
        self._reported_t = report.t
        if self._findings is not None:
            self._findings.feed(report)  # sets report.findings, for the sinks
        self._sinks.write(report)

    def _detach(self) -> None:
        """Remove hooks from the optimizer (framework monitors override this)."""

    def close(self) -> None:
        """Detach from the optimizer and flush and close every sink (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._detach()
        if self._findings is not None:
            self._findings.finish()
        self._sinks.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
