"""Findings: what is wrong with a run, in plain words, computed from lrscope's own reports.

Each rule (``RULES``, by id) has a severity (a *warning* makes ``lrscope check`` exit
with 1, an *info* does not), a documented threshold with its reason, and an explanation
of the likely causes and what to try.  One engine serves both uses:

* live: ``lrscope.watch(..., findings=True)`` (the default) feeds each report to a
  ``Checker``, warns once per rule and subject when it first holds, writes the new findings
  to the sinks and keeps them in ``monitor.findings``;
* offline: ``lrscope check LOGDIR`` reads the run's JSONL or TensorBoard logs.

>>> from lrscope.report import GroupReport, StepReport
>>> checker = Checker()
>>> for t in (1, 2):
...     found = checker.feed(StepReport(t=t, optimizer="SGD", framework="torch", family="sgd",
...                          groups=[GroupReport(name="pg0", lr=0.1 * (t - 1), step_size=0.1)]))
>>> [(f.id, f.severity, f.subject, f.steps_text()) for f in checker.findings]
[('warmup_starts_at_zero', 'info', 'lr-SGD/pg0', '1')]

The rules are documented in ``docs/findings.md``; ``lrscope check --rules`` lists them.
"""

from __future__ import annotations

from lrscope.findings.checker import RULES, Checker
from lrscope.findings.core import SEVERITIES, Finding, Rule

__all__ = ["Checker", "Finding", "RULES", "Rule", "SEVERITIES"]
