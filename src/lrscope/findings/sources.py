"""The steps of a run's logs, for ``lrscope check``: lrscope's JSONL, else TensorBoard events.

Files are read with ``lrscope.logs`` (malformed lines skipped and counted, event files
read up to where they stop making sense), and a series whose t goes back (a run started
again in the same log_dir, or resumed from an earlier checkpoint) keeps the later records
from that t on, as TensorBoard does.
Bad input raises ValueError with a one-line message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from lrscope.logs import log_location
from lrscope.findings.observe import Point, Step, from_points, from_record, split_tag
from lrscope.sinks.jsonl import FILE_NAME as JSONL_FILE_NAME


@dataclass
class Source:
    """Where the steps come from (``description``), the steps, and notes on how they were read."""

    description: str
    steps: list[Step]
    notes: list[str] = field(default_factory=list)


class _Restarts:
    """Steps kept per series prefix, the later replacing the earlier from a t that went back."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.last_t: dict[str, int] = {}
        self.went_back: dict[str, tuple[int, int, int]] = {}  # prefix: (last t, lower t, count)

    def add(self, step: Step) -> None:
        last = self.last_t.get(step.prefix)
        if step.skipped:  # t did not advance: no restart, nothing to judge but its findings
            if step.findings:
                self.steps.append(step)
            return
        if last is not None and step.t <= last:
            first_last, lower, count = self.went_back.get(step.prefix, (last, step.t, 0))
            self.went_back[step.prefix] = (first_last, lower, count + 1)
            self.steps = [s for s in self.steps if s.prefix != step.prefix or s.t < step.t]
        self.last_t[step.prefix] = step.t
        self.steps.append(step)

    def notes(self) -> list[str]:
        return [f"{prefix}: t went back{f' {count} times, first' if count > 1 else ''} from {last} "
                f"to {t} (a new run in the same log_dir, or one resumed from an earlier "
                "checkpoint): the records written later replace the earlier ones from that t on"
                for prefix, (last, t, count) in self.went_back.items()]


def read(log_dir: str | os.PathLike) -> Source:
    """The steps in ``log_dir`` (a directory, or a .jsonl file): its ``lrscope.jsonl`` (or
    another .jsonl file with lrscope records), else its TensorBoard event files."""
    path, is_dir = log_location(log_dir)
    notes: list[str] = []
    if is_dir:
        candidates = [path / JSONL_FILE_NAME] if os.path.lexists(path / JSONL_FILE_NAME) else []
        candidates += sorted(p for p in path.glob("*.jsonl") if p.name != JSONL_FILE_NAME)
    else:
        candidates = [path]
    for candidate in candidates:
        try:
            source = _read_jsonl(candidate)
        except ValueError as error:  # not a regular file
            if not is_dir:
                raise
            notes.append(str(error))
            continue
        if source.steps:
            source.notes[:0] = notes
            return source
        notes += source.notes
    if is_dir:
        source = _read_events(path)
        if source.steps:
            source.notes[:0] = notes
            return source
        notes += source.notes
    why = f" ({'; '.join(notes)})" if notes else ""
    raise ValueError(
        f"no lrscope data in {path}{why}: expected {JSONL_FILE_NAME} or TensorBoard event files "
        "with lr-<Optimizer>/<group>/... tags, as written by lrscope.watch(..., log_dir=...)")


def _read_jsonl(path: Path) -> Source:
    """The steps of one JSONL file (sketches unread: the rules read the summaries)."""
    from lrscope.logs import JsonlLog

    log, kept = JsonlLog(path, sketches=False), _Restarts()
    for record in log:
        kept.add(from_record(record))
    note = log.note()
    return Source(str(path), kept.steps, ([note] if note else []) + kept.notes())


def _read_events(directory: Path) -> Source:
    """The steps of the event files in ``directory``, one file (one process) after the other
    in the order they were created; a file whose steps of a series start at or below steps
    already read replaces them from there on."""
    from lrscope.logs import EventFile, event_files

    files, others = event_files(directory)
    notes = [f"skipped {len(others)} entries named like event files that are not regular files: "
             f"{', '.join(os.path.basename(p) for p in others)}"] if others else []
    kept = _Restarts()
    for path in files:
        events = EventFile(path)
        try:
            steps = from_points(_points(events))
        except ValueError as error:  # no longer a regular file
            notes.append(str(error))
            continue
        for step in steps:  # in order of t within each prefix
            kept.add(step)
        if events.note():
            notes.append(events.note())  # type: ignore[arg-type]
    return Source(f"{directory} (TensorBoard)", kept.steps, notes + kept.notes())


def _points(events: Iterable[tuple[str, int, float]]) -> Iterable[Point]:
    tags: dict[str, Any] = {}
    for tag, t, value in events:
        if tag not in tags:
            tags[tag] = split_tag(tag)
        if tags[tag] is not None:
            yield (*tags[tag], t, value)
