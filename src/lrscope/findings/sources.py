"""The steps of a run's logs, for ``lrscope check``: lrscope's JSONL, else TensorBoard events.

The one place that knows how logs are read (``lrscope.logs`` for JSONL records, and
``lrscope.plot``'s TensorBoard reader with its rule for restarted runs): switch here when
reading moves.  Bad input raises ValueError with a one-line message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lrscope.findings.observe import Step, from_points, from_record
from lrscope.sinks.jsonl import FILE_NAME as JSONL_FILE_NAME


@dataclass
class Source:
    """Where the steps come from (``description``), the steps, and notes on how they were read."""

    description: str
    steps: list[Step]
    notes: list[str] = field(default_factory=list)


def read(log_dir: str | os.PathLike) -> Source:
    """The steps in ``log_dir`` (a directory, or a .jsonl file): its ``lrscope.jsonl`` (or
    another .jsonl file with lrscope records), else its TensorBoard event files."""
    from lrscope import plot
    from lrscope.logs import read_jsonl

    path = Path(log_dir)
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    candidates = [path] if path.is_file() else [path / JSONL_FILE_NAME, *sorted(path.glob("*.jsonl"))]
    restarts: list[plot.Restart] = []
    try:
        for candidate in candidates:
            if candidate.is_file() and candidate.suffix == ".jsonl":
                records = plot.latest_records(read_jsonl(candidate), restarts)
                steps = [from_record(record) for _, _, record in records]
                if steps:
                    return Source(str(candidate), steps, plot.restart_notes(restarts))
        if path.is_dir() and any(path.glob("*tfevents*")):
            steps = from_points(plot._event_points(path, restarts))
            if steps:
                return Source(f"{path} (TensorBoard)", steps, plot.restart_notes(restarts))
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ValueError(f"cannot read {path}: not a text file") from None
    raise ValueError(
        f"no lrscope data in {path}: expected {JSONL_FILE_NAME} or TensorBoard event files with "
        "lr-<Optimizer>/<group>/... tags, as written by lrscope.watch(..., log_dir=...)")

