"""The data ``lrscope plot`` draws: a log directory read into series, downsampled as read.

``load`` reads lrscope's own ``lrscope.jsonl`` (or a given .jsonl file), else the
TensorBoard event files of the directory (tags ``lr-<Optimizer>/<group>/<metric>`` as lrscope
writes them), with ``lrscope.logs``: malformed lines, event files cut short and entries
that are not regular files are skipped and named in ``Run.notes``.  Every series is
downsampled while reading (``lrscope.downsample``), so that memory follows the figure's
resolution, not the length of the run.
"""

from __future__ import annotations

import gc
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from lrscope.downsample import Downsampled
from lrscope.logs import (MAX_LINE_BYTES, EventFile, JsonlLog, event_files, log_location, malformed_note,
                         open_regular)
from lrscope.report import tag_prefix
from lrscope.sinks.jsonl import FILE_NAME as JSONL_FILE_NAME

DISTRIBUTIONS = ("effective_lr", "update_magnitude")
_GROUP_SCALARS = ("lr", "step_size", "weight_decay_rate", "update_to_param")
GROUP, TENSOR = "group", "tensor"  # kinds of rows: a group's scalars, a tensor's update ratio
#: The metric of alpha_t / lr in ``Run.groups`` (derived from the steps that logged both).
RATIO = "step_size/lr"
#: (series prefix ``lr-<Optimizer or name>``, the last t logged, the lower t that followed it)
Restart = tuple[str, int, int]


@dataclass
class Series:
    """One metric over the steps where it was logged."""

    steps: np.ndarray
    values: np.ndarray


@dataclass
class Run:
    """What a log directory holds, keyed like the TensorBoard tags.

    ``groups["lr-Adam/pg0"]["effective_lr/p50"]`` and
    ``params["lr-Adam/pg0"]["0.weight"]["update_to_param"]`` are Series.
    """

    source: str
    groups: dict[str, dict[str, Series]] = field(default_factory=dict)
    params: dict[str, dict[str, dict[str, Series]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


#: Rows (a mapping of metrics and its t) held before they are downsampled column by column.
ROWS = 16_384


class _Points:
    """The series of one log, downsampled as points arrive, with TensorBoard's rule for a
    step counter that goes back: when t of a series prefix (``lr-<Optimizer or name>``)
    returns to a t it already logged (the script run again with the same log_dir, or
    resumed from an earlier checkpoint), the later points replace the earlier ones from that
    t on.  All ranks of a DDP run writing one log_dir go back on every record: each point
    is removed at most once, so that stays linear.

    JSONL records arrive as rows: a group, an ``extra``, a distribution summary or a tensor
    entry, with its t (``add_row``); every ``ROWS`` rows, each metric becomes a column that
    numpy converts and ``Downsampled.extend`` takes at once.  TensorBoard's points arrive
    one by one (``add``).
    """

    def __init__(self) -> None:
        self.series: dict[str, dict[tuple[str, str | None, str], Downsampled]] = defaultdict(dict)
        self.rows: dict[str, dict[tuple[str, str | None, str], tuple[list, list]]] = defaultdict(dict)
        self.held = 0
        self.last_t: dict[str, int] = {}
        self.first_t: dict[str, int] = {}  # per prefix, the t of its first record
        self.lowest_t: dict[str, int] = {}  # per prefix, the lowest t of its records
        self.restarts: dict[str, list[int]] = {}  # prefix: [last t, lower t, how often]
        self._pairs: dict[str, list] = {}  # group key: [step, lr, step, step size]

    def went_back(self, prefix: str, t: int) -> None:
        """Record that ``prefix`` goes back to ``t`` and drop its points from ``t`` on."""
        if prefix in self.restarts:
            self.restarts[prefix][2] += 1
        else:
            self.restarts[prefix] = [self.last_t[prefix], t, 1]
        for steps, rows in self.rows[prefix].values():
            while steps and steps[-1] >= t:
                steps.pop()
                rows.pop()
                self.held -= 1
        for series in self.series[prefix].values():
            series.truncate(t)
        for key in [key for key in self._pairs if key.startswith(f"{prefix}/")]:
            del self._pairs[key]
        self.last_t[prefix] = t
        self.lowest_t[prefix] = min(self.lowest_t.get(prefix, t), t)

    def series_of(self, prefix: str, key: tuple[str, str | None, str]) -> Downsampled:
        series = self.series[prefix]
        target = series.get(key)
        if target is None:
            target = series[key] = Downsampled()
        return target

    def add(self, prefix: str, group: str, param: str | None, metric: str, step: int,
            value: float) -> None:
        self.series_of(prefix, (group, param, metric)).add(step, value)
        if param is None and metric in ("lr", "step_size"):
            self._pair(prefix, group, metric, step, value)

    def _pair(self, prefix: str, group: str, metric: str, step: int, value: float) -> None:
        """The ratio alpha_t / lr, where a step logged both: downsampled on its own, so that
        its dip survives as the extreme it is."""
        pair = self._pairs.setdefault(f"{prefix}/{group}", [None, 0.0, None, 0.0])
        index = 0 if metric == "lr" else 2
        pair[index], pair[index + 1] = step, value
        if pair[0] == pair[2] and pair[1] != 0:
            ratio = pair[3] / pair[1]
            if math.isfinite(ratio):
                self.series_of(prefix, (group, None, RATIO)).add(step, ratio)
            pair[0] = pair[2] = None

    def add_row(self, prefix: str, group: str, param: str | None, kind: str, t: int,
                row: dict[str, Any]) -> None:
        """Hold ``row`` (``kind``: GROUP, TENSOR, "extra" or a distribution's label)."""
        rows = self.rows[prefix]
        key = (group, param, kind)
        held = rows.get(key)
        if held is None:
            held = rows[key] = ([], [])
        held[0].append(t)
        held[1].append(row)
        self.held += 1

    def flush(self) -> None:
        """Downsample the rows held, one numpy column per metric."""
        for prefix, buffers in self.rows.items():
            for (group, param, kind), (steps, rows) in buffers.items():
                if steps:
                    self._columns(prefix, group, param, kind, np.array(steps, np.int64), rows)
                    steps.clear()
                    rows.clear()
        self.held = 0

    def _columns(self, prefix: str, group: str, param: str | None, kind: str, steps: np.ndarray,
                 rows: list[dict[str, Any]]) -> None:
        if kind == GROUP:
            names: Iterable[str] = _GROUP_SCALARS
        elif kind == TENSOR:
            names = ("update_to_param",)
        else:
            names = set().union(*rows)
            names.discard("sketch")
        columns = {}
        for name in names:
            values = np.array([row.get(name) for row in rows], np.float64)  # None: NaN
            columns[name] = values
            metric = name if kind in (GROUP, TENSOR, "extra") or name == "eps_dominated" else f"{kind}/{name}"
            self._extend(prefix, (group, param, metric), steps, values)
        if kind == GROUP:
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                self._extend(prefix, (group, None, RATIO), steps, columns["step_size"] / columns["lr"])

    def _extend(self, prefix: str, key: tuple[str, str | None, str], steps: np.ndarray,
                values: np.ndarray) -> None:
        finite = np.isfinite(values)
        if finite.any():
            self.series_of(prefix, key).extend(steps[finite], values[finite])

    def run(self, source: str, notes: list[str]) -> Run:
        self.flush()
        run = Run(source=source, notes=list(notes))
        for prefix, series in self.series.items():
            for (group, param, metric), points in series.items():
                steps, values = points.points()
                if not steps.size:
                    continue
                key = f"{prefix}/{group}"
                if param is None:
                    run.groups.setdefault(key, {})[metric] = Series(steps, values)
                else:
                    run.params.setdefault(key, {}).setdefault(param, {})[metric] = Series(steps, values)
        run.notes += [_restart_note(prefix, *restart) for prefix, restart in self.restarts.items()]
        return run


def restart_notes(restarts: Iterable[Restart]) -> list[str]:
    """One note per series that went back (however often: processes writing to one log_dir
    at once would otherwise give one per step).

    >>> restart_notes([("lr-Adam", 5, 1), ("lr-Adam", 5, 4)])
    ['lr-Adam: t went back 2 times, first from 5 to 1 (a new run in the same log_dir, or one resumed from an earlier checkpoint): the records written later replace the earlier ones from that t on']
    """
    first: dict[str, Restart] = {}
    count: dict[str, int] = defaultdict(int)
    for restart in restarts:
        first.setdefault(restart[0], restart)
        count[restart[0]] += 1
    return [_restart_note(prefix, last, t, count[prefix]) for prefix, (_, last, t) in first.items()]


def _restart_note(prefix: str, last: int, t: int, count: int) -> str:
    times = f" {count} times, first" if count > 1 else ""
    return (f"{prefix}: t went back{times} from {last} to {t} (a new run in the same log_dir, or "
            "one resumed from an earlier checkpoint): the records written later replace the "
            "earlier ones from that t on")


def _read_jsonl(path: Path, workers: int | None = None) -> tuple[_Points, list[str]]:
    """The points of an lrscope JSONL file (sketches unread: the figure draws summaries).
    A file over ``PARALLEL_BYTES`` is split between ``workers`` processes (default: one per
    CPU this process may use, at most 8), one range of lines each (see ``_merge``)."""
    try:
        size = os.stat(path).st_size
    except OSError:
        size = 0  # JsonlLog says why
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        workers = min(cpus or 1, 8, size // PARALLEL_BYTES)
    starts = _line_starts(path, size, workers) if workers > 1 else [0]
    if len(starts) == 1:
        return _read_part(path)[:2]
    stops = [*starts[1:], None]
    try:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(len(starts) - 1, mp_context=multiprocessing.get_context("spawn")) as pool:
            later = pool.map(_read_part_flushed, [path] * (len(starts) - 1), starts[1:], stops[1:])
            first = _read_part(path, 0, starts[1])
            parts = [first, *later]
    except (OSError, RuntimeError, ImportError):  # no processes here (a sandbox): one reads all
        return _read_part(path)[:2]
    return _merge(path, parts)


#: A JSONL log larger than this is read by several processes (a million steps of a small
#: model, distributions every 50 steps, is about 600 MB).
PARALLEL_BYTES = 64 << 20


def _line_starts(path: Path, size: int, parts: int) -> list[int]:
    """Offsets of lines that split the file into about ``parts`` equal ranges."""
    starts = [0]
    with open_regular(path) as handle:
        for part in range(1, parts):
            handle.seek(max(size * part // parts - 1, starts[-1]))
            handle.readline(MAX_LINE_BYTES)  # to the start of the next line
            if handle.tell() < size and handle.tell() > starts[-1]:
                starts.append(handle.tell())
    return starts


def _read_part(path: Path, start: int = 0, stop: int | None = None) -> tuple[_Points, list[str], JsonlLog]:
    """The points of the lines from byte ``start`` to ``stop``.  The garbage collector waits
    meanwhile: records hold no cycles, and its passes over the rows held cost a tenth."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _read_lines(path, start, stop)
    finally:
        if collecting:
            gc.enable()


def _read_lines(path: Path, start: int, stop: int | None) -> tuple[_Points, list[str], JsonlLog]:
    points, log = _Points(), JsonlLog(path, sketches=False, start=start, stop=stop)
    add_row, last_t, lowest_t = points.add_row, points.last_t, points.lowest_t
    for record in log:
        if record.get("skipped"):  # GradScaler's skipped steps: no step taken
            continue
        prefix, t = tag_prefix(record["optimizer"], record.get("name")), record["t"]
        if prefix not in last_t:
            lowest_t[prefix] = points.first_t[prefix] = t
        elif t <= last_t[prefix]:
            points.went_back(prefix, t)
        last_t[prefix] = t
        for group in record["groups"]:
            name = group["name"]
            add_row(prefix, name, None, GROUP, t, group)
            if group.get("extra"):
                add_row(prefix, name, None, "extra", t, group["extra"])
            for label in DISTRIBUTIONS:
                if group.get(label):
                    add_row(prefix, name, None, label, t, group[label])
            for param, entry in (group.get("params") or {}).items():
                add_row(prefix, name, param, TENSOR, t, entry)
                for label in DISTRIBUTIONS:
                    if entry.get(label):
                        add_row(prefix, name, param, label, t, entry[label])
        if points.held >= ROWS:
            points.flush()
    note = log.note()
    return points, [note] if note else [], log


def _read_part_flushed(path: Path, start: int, stop: int | None) -> tuple[_Points, list[str], JsonlLog]:
    """``_read_part`` in another process: what comes back is pickled, the rows flushed."""
    points, notes, log = _read_part(path, start, stop)
    points.flush()
    return points, notes, log


def _merge(path: Path, parts: list[tuple[_Points, list[str], JsonlLog]]) -> tuple[_Points, list[str]]:
    """The parts of one file read apart, as if read in one pass.  A part's first record of a
    prefix at or below the t the parts before it ended on is a restart between them; and of
    a prefix, the parts before keep only the points below the lowest t the part has of it
    (each record drops the points from its t on, and the parts before only lose points)."""
    merged = parts[0][0]
    merged.flush()
    for points, _, _ in parts[1:]:
        for prefix, first_t in points.first_t.items():
            if prefix in merged.last_t:
                if first_t <= merged.last_t[prefix]:
                    _count(merged.restarts, prefix, [merged.last_t[prefix], first_t, 1])
                for series in merged.series[prefix].values():
                    series.truncate(points.lowest_t[prefix])
            if prefix in points.restarts:
                _count(merged.restarts, prefix, points.restarts[prefix])
            for key, series in points.series[prefix].items():
                merged.series_of(prefix, key).extend(*series.points())
            merged.last_t[prefix] = points.last_t[prefix]
    malformed, first, lines = 0, None, 0
    for _, _, log in parts:
        if log.malformed:
            malformed += log.malformed
            first = first or lines + (log.first_malformed or 0)
        lines += log.lines
    return merged, [malformed_note(path, malformed, first)] if malformed else []


def _count(restarts: dict[str, list[int]], prefix: str, restart: list[int]) -> None:
    """Add ``restart`` (``[last t, lower t, how often]``) to ``restarts``: the first one stays."""
    if prefix in restarts:
        restarts[prefix][2] += restart[2]
    else:
        restarts[prefix] = list(restart)


def _split_tag(tag: str) -> tuple[str, str | None, str] | None:
    """Split a tag into (group key, tensor or None, metric); None for other tags.

    >>> _split_tag("lr-Adam/pg0/dense/kernel/effective_lr/p50")
    ('lr-Adam/pg0', 'dense/kernel', 'effective_lr/p50')
    >>> _split_tag("lr-NAdam/pg1/step_size_grad"), _split_tag("loss")
    (('lr-NAdam/pg1', None, 'step_size_grad'), None)
    """
    parts = tag.split("/")
    if len(parts) < 3 or not parts[0].startswith("lr-"):
        return None
    key, rest = "/".join(parts[:2]), parts[2:]
    metric_length = 2 if len(rest) >= 2 and rest[-2] in DISTRIBUTIONS else 1
    param = "/".join(rest[:-metric_length]) or None
    return key, param, "/".join(rest[-metric_length:])


def _read_events(paths: list[str]) -> tuple[_Points, list[str]]:
    """The lrscope scalars of event files, one file (one process) after the other in the order
    they were created: a file whose steps of a series prefix start at or below steps already
    read replaces them from there on (within a file, TensorBoard's own rule per tag)."""
    points, notes = _Points(), []
    tags: dict[str, tuple[str, str, str | None, str] | None] = {}
    for path in paths:
        seen: set[str] = set()
        events = EventFile(path)
        try:
            for tag, step, value in events:
                if tag not in tags:
                    parsed = _split_tag(tag)
                    tags[tag] = None if parsed is None else (
                        parsed[0].split("/", 1)[0], parsed[0].split("/", 1)[1], parsed[1], parsed[2])
                parsed_tag = tags[tag]
                if parsed_tag is None or not math.isfinite(value):
                    continue
                prefix = parsed_tag[0]
                if prefix not in seen:
                    seen.add(prefix)
                    if prefix in points.last_t and step <= points.last_t[prefix]:
                        points.went_back(prefix, step)
                points.last_t[prefix] = max(points.last_t.get(prefix, step), step)
                points.add(*parsed_tag, step, value)
        except ValueError as error:  # no longer a regular file
            notes.append(str(error))
        if events.note():
            notes.append(events.note())
    return points, notes


def load(log_dir: str | os.PathLike) -> Run:
    """Read ``lrscope.jsonl`` (or a given .jsonl file), else TensorBoard event files, each
    series downsampled while reading (``lrscope.downsample``).  ``run.notes`` says what was
    skipped: malformed lines, event files cut short, entries that are not files.

    Raises ValueError, in one line, when there is no lrscope data.
    """
    path, is_dir = log_location(log_dir)
    notes: list[str] = []
    if not is_dir:
        candidates = [path]
    else:
        others = sorted(p for p in path.glob("*.jsonl") if p.name != JSONL_FILE_NAME)
        candidates = [path / JSONL_FILE_NAME] if os.path.lexists(path / JSONL_FILE_NAME) else []
        candidates += others
    for candidate in candidates:
        if candidate.suffix != ".jsonl":
            continue
        try:
            points, skipped = _read_jsonl(candidate)
        except ValueError as error:  # not a regular file
            if not is_dir:
                raise
            notes.append(str(error))
            continue
        run = points.run(str(candidate), notes + skipped)
        if run.groups:
            return run
        notes += skipped
    if is_dir:
        files, others = event_files(path)
        if others:
            what = ("1 entry named like an event file that is not a regular file" if len(others) == 1
                    else f"{len(others)} entries named like event files that are not regular files")
            notes.append(f"skipped {what}: {', '.join(os.path.basename(p) for p in others)}")
        if files:
            points, skipped = _read_events(files)
            run = points.run(f"{path} (TensorBoard)", notes + skipped)
            if run.groups:
                return run
            notes += skipped
    why = f" ({'; '.join(notes)})" if notes else ""
    raise ValueError(
        f"no lrscope data in {path}{why}: expected {JSONL_FILE_NAME} or TensorBoard event files "
        "with lr-<Optimizer>/<group>/... tags, as written by lrscope.watch(..., log_dir=...)")
