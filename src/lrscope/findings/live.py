"""Findings while training: what a Monitor does with each report it emits.

``LiveFindings.feed(report)`` runs the rules over the report already built (no extra
measurement: a few comparisons per group, and per tensor on measured steps), sets
``report.findings`` to those that hold for the first time, so the sinks write each once,
and raises one Python warning per rule and step for the new *warnings* (infos go to the
sinks and ``monitor.findings`` only).  Nothing here may stop training: if checking raises,
one warning, and findings are off for the rest of the run.

>>> import warnings
>>> from lrscope.report import GroupReport, StepReport
>>> live = LiveFindings()
>>> def report(t, lr):
...     return StepReport(t=t, optimizer="SGD", framework="torch", family="sgd",
...                       groups=[GroupReport(name="pg0", lr=lr, step_size=lr)])
>>> live.feed(report(1, 0.1))
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     live.feed(second := report(2, 0.0))
>>> [f.id for f in second.findings], "lr_zero" in str(caught[0].message)
(['lr_zero'], True)
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

from lrscope._warnings import warn
from lrscope.findings.checker import Checker
from lrscope.findings.core import Finding, Rule
from lrscope.report import StepReport

#: Subjects named in one warning; the rest are counted.
NAMED_SUBJECTS = 4


class LiveFindings:
    """A Checker fed by a monitor, warning once per (rule, subject)."""

    def __init__(self) -> None:
        self.checker = Checker()
        self._failed = False
        self._explained: set[str] = set()

    @property
    def findings(self) -> list[Finding]:
        return self.checker.findings

    def feed(self, report: StepReport) -> None:
        """Judge ``report``; set its ``findings`` to the new ones and warn about them."""
        if self._failed:
            return
        try:
            new = self.checker.feed(report)
        except Exception as error:  # noqa: BLE001 - a monitor must never stop training
            self._failed = True
            warn(f"lrscope: checking the findings failed ({type(error).__name__}: {error}); "
                 "findings are off for the rest of this run, training continues. Please report it.")
            return
        if new:
            # Copies: the Checker extends its findings' steps later, while the background
            # sinks may not have written this report yet.
            report.findings = [replace(f, steps=list(f.steps)) for f in new]
            self._warn(new, report.t)

    def found(self, rule: Rule, subject: str, t: int, message: str) -> None:
        """A finding a framework monitor judged itself (a live-only rule): reported with the
        next report, like the Checker's own."""
        self.checker.add(Finding(rule.id, rule.severity, subject, [(t, t)], message, rule.explanation))

    def finish(self) -> None:
        """The rules that need the end of the run (called by ``close()``): warn only."""
        if not self._failed:
            try:
                self._warn(self.checker.finish(), None)
            except Exception as error:  # noqa: BLE001
                warn(f"lrscope: checking the findings failed ({type(error).__name__}: {error})")

    def _warn(self, new: list[Finding], t: int | None) -> None:
        by_rule: dict[str, list[Finding]] = defaultdict(list)
        for finding in new:
            if finding.severity == "warning":
                by_rule[finding.id].append(finding)
        for rule_id, found in by_rule.items():
            named = "; ".join(f"{f.subject}: {f.message}" for f in found[:NAMED_SUBJECTS])
            more = f"; and {len(found) - NAMED_SUBJECTS} more" if len(found) > NAMED_SUBJECTS else ""
            when = f"at step {t}" if t is not None else "at the end of the run"
            text = f"lrscope finding [{rule_id}] {when}: {named}{more}."
            if rule_id not in self._explained:
                self._explained.add(rule_id)
                text += f" {found[0].explanation}"
            warn(text + " (monitor.findings keeps every finding; `lrscope check LOGDIR` lists a "
                        "run's findings from its logs.)")
