"""``Checker``: runs every rule over a stream of steps and keeps one Finding per (rule, subject).

Fed one report (live) or one log record (offline) at a time; ``feed`` returns the findings
that hold for the first time at that step, so a monitor can warn once, and ``finish`` those
that need the end of the run.  ``findings`` is everything found so far, each with the
steps where it held.
"""

from __future__ import annotations

from typing import Any, Iterable

from lrscope.findings import family_rules, schedule_rules, state_rules, update_rules
from lrscope.findings.core import SEVERITIES, Finding, Rule, RuleLogic, Verdict
from lrscope.findings.observe import Step, from_record, from_report
from lrscope.report import StepReport

#: Every rule's logic, in the order findings are listed.
LOGIC: list[type[RuleLogic]] = [*state_rules.RULES, *update_rules.RULES, *schedule_rules.RULES,
                                 *family_rules.RULES]
#: Every rule, by id: those judged by the Checker, then those a framework monitor judges.
RULES: dict[str, Rule] = {r.rule.id: r.rule for r in LOGIC}
RULES[schedule_rules.SCHEDULER_BEFORE_OPTIMIZER.id] = schedule_rules.SCHEDULER_BEFORE_OPTIMIZER


def as_step(source: StepReport | dict[str, Any] | Step) -> Step:
    """A Step from a live report, a JSONL record or a Step."""
    if isinstance(source, Step):
        return source
    if isinstance(source, StepReport):
        return from_report(source)
    return from_record(source)


class Checker:
    """Judges steps with every rule (less those in ``ignore``); see the module docstring.

    >>> import numpy as np
    >>> from lrscope.report import GroupReport, StepReport
    >>> def report(t, lr):
    ...     return StepReport(t=t, optimizer="SGD", framework="torch", family="sgd",
    ...                       groups=[GroupReport(name="pg0", lr=lr, step_size=lr)])
    >>> checker = Checker()
    >>> checker.feed(report(1, 0.1))
    []
    >>> [f.line() for f in checker.feed(report(2, 0.0))]
    ['warning [lr_zero] lr-SGD/pg0 (steps 2): lr was 0']
    >>> checker.feed(report(3, 0.0))
    []
    >>> checker.findings[0].steps
    [(2, 3)]
    """

    def __init__(self, ignore: Iterable[str] = ()):
        ignored = set(ignore)
        unknown = ignored - RULES.keys()
        if unknown:
            raise ValueError(f"unknown rule id(s) {sorted(unknown)}; known: {sorted(RULES)}")
        self.ignored = ignored
        self._logic = [cls() for cls in LOGIC if cls.rule.id not in ignored]
        self._found: dict[tuple[str, str], Finding] = {}
        self._holding: set[tuple[str, str]] = set()
        self._new: list[Finding] = []
        self._last_t = 0

    def feed(self, source: StepReport | dict[str, Any] | Step) -> list[Finding]:
        """Judge one step; the findings that hold for the first time (a rule, a subject)."""
        step = as_step(source)
        for recorded in step.findings:
            rule = RULES.get(str(recorded.get("id")))
            if rule is not None and rule.live_only:  # the others are judged again here
                self.add(Finding.from_dict(recorded))
        self._last_t = max(self._last_t, step.t)
        if not step.skipped:
            measured = step.measured
            for logic in self._logic:
                if logic.measured_only and not measured:
                    continue
                for verdict in logic.observe(step):
                    self._apply(logic.rule, verdict, step.t)
        return self._take_new()

    def finish(self) -> list[Finding]:
        """Judge what needs the whole run; the findings that hold for the first time."""
        for logic in self._logic:
            for verdict in logic.finish():
                self._apply(logic.rule, verdict, self._last_t)
        return self._take_new()

    def add(self, finding: Finding) -> None:
        """A finding judged elsewhere (a framework monitor's live-only rule), kept like the others."""
        if finding.id in self.ignored:
            return
        key = (finding.id, finding.subject)
        if key in self._found:
            known = self._found[key]
            known.steps = sorted(set(known.steps) | set(finding.steps))
            return
        self._found[key] = finding
        self._new.append(finding)

    @property
    def findings(self) -> list[Finding]:
        """Every finding so far: warnings first, then by rule and subject."""
        order = {rule_id: i for i, rule_id in enumerate(RULES)}
        return sorted(self._found.values(), key=lambda f: (SEVERITIES.index(f.severity),
                                                           order.get(f.id, len(order)), f.subject))

    def _apply(self, rule: Rule, verdict: Verdict, t: int) -> None:
        key = (rule.id, verdict.subject)
        if verdict.message is None:
            self._holding.discard(key)
            return
        t = verdict.until if verdict.until is not None else t
        finding = self._found.get(key)
        start = verdict.since if verdict.since is not None else t
        if finding is None:
            finding = self._found[key] = Finding(rule.id, rule.severity, verdict.subject,
                                                 [(start, t)], verdict.message, rule.explanation)
            self._new.append(finding)
        elif key in self._holding:
            finding.steps[-1] = (finding.steps[-1][0], max(t, finding.steps[-1][1]))
            finding.message = verdict.message
        else:
            finding.steps.append((max(start, finding.steps[-1][1] + 1), t))
            finding.message = verdict.message
        self._holding.add(key)

    def _take_new(self) -> list[Finding]:
        new, self._new = self._new, []
        return new
