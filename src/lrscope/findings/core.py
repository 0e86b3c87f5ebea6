"""A finding, a rule's description, and the base class of the rules' logic.

A ``Rule`` is the documented part (id, severity, threshold and its reason, the
explanation); a ``RuleLogic`` subclass carries one and judges a stream of ``Step``s,
keeping what it needs of their history.  ``observe`` returns a ``Verdict`` for each
subject (a tensor ``lr-<Optimizer>/<group>/<tensor>`` or a group ``lr-<Optimizer>/<group>``)
it could judge at this step: a message when the rule holds, None when it does not.

>>> f = Finding("lr_zero", "warning", "lr-SGD/pg0", [(1, 3), (7, 7)], "lr was 0", "...")
>>> f.steps_text(), Finding.from_dict(f.to_dict()) == f
('1-3, 7', True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, NamedTuple

from lrscope.findings.observe import GroupStep, Stats, Step

#: Severities, most serious first: a warning makes ``lrscope check`` exit with 1, an info does not.
SEVERITIES = ("warning", "info")


@dataclass(frozen=True)
class Rule:
    """What a rule checks, documented: ``threshold`` states the test and its numbers,
    ``reason`` why those numbers, ``explanation`` the likely causes and what to try, and
    ``needs`` what the rule reads (and so what it cannot see)."""

    id: str
    severity: str
    title: str
    threshold: str
    reason: str
    explanation: str
    needs: str
    #: Judged by a live monitor only (the logs do not carry its input); ``lrscope check``
    #: reports it when the monitor recorded it in the JSONL log.
    live_only: bool = False


@dataclass
class Finding:
    """One rule holding for one subject: ``steps`` are the (first, last) ranges of the
    steps it was judged on and held (distributions are judged every ``every`` steps)."""

    id: str
    severity: str
    subject: str
    steps: list[tuple[int, int]]
    message: str
    explanation: str

    def steps_text(self) -> str:
        return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in self.steps)

    def line(self) -> str:
        """One line: severity, id, subject, steps and message."""
        return f"{self.severity} [{self.id}] {self.subject} (steps {self.steps_text()}): {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "severity": self.severity, "subject": self.subject,
                "steps": [list(r) for r in self.steps], "message": self.message,
                "explanation": self.explanation}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        return cls(str(data["id"]), str(data["severity"]), str(data["subject"]),
                   [(int(a), int(b)) for a, b in data.get("steps", [])], str(data.get("message", "")),
                   str(data.get("explanation", "")))


class Verdict(NamedTuple):
    """A rule's judgement of one subject at one step: ``message`` None when it does not
    hold; ``since``, the step it has held since (a rule that needs it to hold for a while
    says so once it has), ``until`` the last step it concerns (default: the step judged)."""

    subject: str
    message: str | None
    since: int | None = None
    until: int | None = None


class RuleLogic:
    """Judges a stream of Steps for one Rule; one instance per Checker (it keeps history)."""

    rule: Rule
    #: Judges distributions only: not called on steps without them (most steps, every=N).
    measured_only = False

    def observe(self, step: Step) -> Iterable[Verdict]:
        return ()

    def finish(self) -> Iterable[Verdict]:
        """Verdicts that need the end of the run (``since`` gives the steps' start)."""
        return ()


@dataclass
class Subject:
    """A tensor or a group of one step, as the rules iterate over them."""

    name: str
    group: GroupStep
    stats: Stats
    tensor: str | None = None  # None: the group itself
    extra: dict[str, Any] = field(default_factory=dict)


def subjects(step: Step, groups: bool = True, tensors: bool = True) -> Iterator[Subject]:
    """The group and tensor statistics of a measured step, named ``prefix/group[/tensor]``."""
    for group in step.groups:
        base = f"{step.prefix}/{group.name}"
        if groups and group.stats is not None:
            yield Subject(base, group, group.stats)
        if tensors:
            for name, stats in group.params.items():
                yield Subject(f"{base}/{name}", group, stats, name)


def percent(fraction: float) -> str:
    """``0.4567`` -> ``'46%'``; ``'0.05%'`` for small shares, so that 0 means none.

    >>> percent(0.4567), percent(0.0005), percent(1.0)
    ('46%', '0.05%', '100%')
    """
    value = 100 * fraction
    return f"{value:.0f}%" if value >= 1 or value == 0 else f"{value:.2g}%"
