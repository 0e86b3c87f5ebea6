"""TensorBoard sink: scalars, a custom-scalars layout and log10(eta) histograms.

Tags follow Lightning's ``LearningRateMonitor``: ``lr-<Optimizer>/<group>/<metric>``,
e.g. ``lr-AdamW/pg0/step_size``, ``lr-AdamW/pg0/effective_lr/p50``,
``lr-AdamW/pg0/eps_dominated``, ``lr-AdamW/pg0/update_to_param`` (every key of
``report.scalars()`` except distribution counts).  Per group, the *Custom Scalars* tab
shows lr and step_size on one chart, the p05-p50-p95 band of the effective lr, and the
eps_dominated and update_to_param series.  Every ``histogram_every`` steps, each tensor
gets a histogram of log10(eta) under ``<prefix>/<group>/<tensor>/log10_effective_lr``
(``log10_update_magnitude`` in empirical mode); values <= 0 are left out of it.
New findings (``report.findings``) go to the *Text* tab under ``<prefix>/findings``.
Skipped steps (``report.skipped``, e.g. GradScaler overflow) are not written: t did
not advance; the JSONL log keeps them.

In a local ``log_dir``, lrscope writes event files of its own (``EventFile``, with
tensorboardX's protocol buffers: ``pip install 'lrscope[tensorboard]'``) from the sink's
thread: a full disk or a deleted directory is an error lrscope sees and waits out, not the
silent death of a writer thread of tensorboardX's that would block every later write.
A ``SummaryWriter`` you already have (tensorboardX or ``torch.utils.tensorboard``, which
share the API), given as ``writer=``, and a remote ``log_dir`` (``s3://...``, ``gs://...``,
written by tensorboardX's ``SummaryWriter``) write through that writer's own thread;
lrscope flushes a writer it did not create but leaves it open.

>>> import tempfile, numpy as np
>>> from lrscope.report import Distribution, GroupReport, StepReport
>>> log_dir = tempfile.mkdtemp()
>>> eta = Distribution.from_array(np.geomspace(1e-5, 1e-2, 1000), eps_dominated=0)
>>> group = GroupReport(name="pg0", lr=1e-3, step_size=3.2e-4, effective_lr=eta)
>>> sink = TensorBoardSink(log_dir)
>>> sink.write(StepReport(t=1, optimizer="Adam", framework="torch", family="adam",
...                       groups=[group]))
>>> sink.close()
>>> from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
>>> [e.value for e in EventAccumulator(log_dir).Reload().Scalars("lr-Adam/pg0/step_size")]
[0.00031...]
"""

from __future__ import annotations

import errno
import itertools
import math
import os
import re
import socket
import struct
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lrscope._optional import require
from lrscope._warnings import warn
from lrscope.report import Distribution, StepReport
from lrscope.sinks._files import close_quietly, open_append, opened, same_file, write_all

_BAND = ("p50", "p05", "p95")


def _exact(tag: str) -> str:
    """Custom-scalars Multiline charts take regular expressions: match ``tag`` only."""
    return f"^{re.escape(tag)}$"


def layout(report: StepReport) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout for the groups of ``report``: one category per group.

    >>> from lrscope.report import GroupReport, StepReport
    >>> rep = StepReport(t=1, optimizer="SGD", framework="torch", family="sgd",
    ...                  groups=[GroupReport(name="pg0", lr=0.1, step_size=0.1)])
    >>> layout(rep)["lr-SGD/pg0"]["lr and step_size"]
    ['Multiline', ['^lr\\\\-SGD/pg0/lr$', '^lr\\\\-SGD/pg0/step_size$']]
    """
    out: dict[str, dict[str, list[Any]]] = {}
    label = "update_magnitude" if report.empirical else "effective_lr"
    title = label.replace("_", " ")
    for group in report.groups:
        base = f"{report.default_prefix}/{group.name}"
        steps = ["lr", "step_size", *group.extra]
        charts: dict[str, list[Any]] = {
            "lr and step_size": ["Multiline", [_exact(f"{base}/{m}") for m in steps]],
            f"{title} p05-p50-p95": ["Margin", [f"{base}/{label}/{q}" for q in _BAND]],
            f"{title} quantiles": ["Multiline", [f"^{re.escape(base)}/{label}/p\\d\\d$"]],
        }
        for metric in ("weight_decay_rate", "eps_dominated", "update_to_param"):
            charts[metric] = ["Multiline", [_exact(f"{base}/{metric}")]]
        out[base] = charts
    return out


#: Numbers the event files this process's sinks create (see EventFile).
_WRITERS = itertools.count()


def _record(event: Any) -> bytes:
    """``event`` framed as a TFRecord: length, masked CRC32C of the length, data, masked
    CRC32C of the data (little-endian)."""
    from tensorboardX.record_writer import masked_crc32c

    data = event.SerializeToString()
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", masked_crc32c(length)) + data
            + struct.pack("<I", masked_crc32c(data)))


class EventFile:
    """An event file of lrscope's own in ``log_dir``, appended one report at a time.

    Its name, ``events.out.tfevents.<time>.<host>.lrscope.<pid>.<n>``, is unique to this
    process (tensorboardX names a file by the second and the host alone: two writers
    started in one directory within a second, such as yours and lrscope's or the ranks of a
    distributed run, wrote one file and the later truncated the earlier), so the file is
    lrscope's alone: each ``write`` appends its records in one system call, and takes them
    back if it fails (a full disk): a torn record would hide every later one from
    TensorBoard.  ``preamble`` (the file version, then the layout) starts every file.  A
    file deleted while open (its log directory deleted and recreated) is followed by a new
    one, with one warning; while the directory is missing, ``write`` raises
    FileNotFoundError (lrscope never recreates a directory someone deleted).
    """

    def __init__(self, log_dir: str | os.PathLike):
        from tensorboardX.proto.event_pb2 import Event

        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.preamble = [_record(Event(wall_time=time.time(), file_version="brain.Event:2"))]
        self._fd: int | None = None
        self._start()

    def _start(self) -> None:
        self.path = self.log_dir / (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
                                    f".lrscope.{os.getpid()}.{next(_WRITERS)}")
        self._fd = open_append(self.path, exclusive=True)
        self._size = 0

    def write(self, records: list[bytes]) -> None:
        if self._fd is None:  # a failed write could not be taken back: a new file
            self._start()
        elif not same_file(self._fd, self.path):
            self._restart()
        assert self._fd is not None
        data = b"".join(self.preamble + records if self._size == 0 else records)
        try:
            write_all(self._fd, data)
        except OSError:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                close_quietly(self._fd)
                self._fd = None
            raise
        self._size += len(data)

    def _restart(self) -> None:
        deleted = self.path
        if self._fd is not None:
            close_quietly(self._fd)
            self._fd = None
        try:
            self._start()
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT, f"the log directory {self.log_dir} was deleted; lrscope writes "
                "there again once it is recreated") from None
        warn(f"lrscope: the TensorBoard event file {deleted} was deleted while lrscope was "
             f"writing to it; lrscope writes on into a new one, {self.path.name}.")

    def close(self) -> None:
        if self._fd is not None:
            close_quietly(self._fd)
            self._fd = None


def log10_histogram(dist: Distribution, bins_per_decade: int = 10) -> dict[str, Any] | None:
    """Keyword arguments of ``add_histogram_raw`` for log10 of the positive values, or None.

    Bucket limits are upper edges (TensorBoard's convention), led by an empty bucket
    marking the lower edge; sums use bucket centres.

    >>> from lrscope.report import Distribution
    >>> h = log10_histogram(Distribution.from_array([1e-3, 1e-3, 1e-2]))
    >>> h["num"], round(h["min"], 6), round(h["max"], 6), int(sum(h["bucket_counts"]))
    (3, -3.0, -2.0, 3)
    """
    edges, counts = dist.histogram(bins_per_decade)
    if counts.size == 0 or counts.sum() == 0:
        return None
    limits = np.log10(edges)
    centres = (limits[:-1] + limits[1:]) / 2
    low = math.log10(dist.min) if dist.min > 0 else float(limits[0])
    return {
        "min": low, "max": math.log10(dist.max), "num": int(counts.sum()),
        "sum": float(np.dot(counts, centres)), "sum_squares": float(np.dot(counts, centres**2)),
        "bucket_limits": limits.tolist(), "bucket_counts": [0, *counts.tolist()],
    }


class TensorBoardSink:
    """Writes reports to TensorBoard event files in ``log_dir`` or to ``writer``.

    ``params=True`` also logs every tensor's scalars (many tags on big models).
    ``flush_secs`` is the flush interval of a ``SummaryWriter`` lrscope creates for a remote
    ``log_dir``; its own event files are written as reports arrive.  A local ``log_dir``
    that cannot be written costs one warning, not an exception: the sink is then
    ``disabled``.
    """

    background = True

    def __init__(self, log_dir: str | os.PathLike | None = None, *, writer: Any = None,
                 histogram_every: int = 1, params: bool = False, flush_secs: int = 10):
        if (log_dir is None) == (writer is None):
            raise ValueError("give TensorBoardSink either log_dir or writer (an existing "
                             "SummaryWriter), not both or neither")
        if int(histogram_every) < 1:
            raise ValueError(f"histogram_every must be a positive number of steps, got {histogram_every}")
        self.histogram_every = int(histogram_every)
        self.params = params
        self._owns_writer = writer is None
        self._events: EventFile | None = None
        if writer is None:
            tensorboardx = require("tensorboardX", "tensorboard")
            if "://" in os.fspath(log_dir):
                writer = tensorboardx.SummaryWriter(
                    logdir=os.fspath(log_dir), flush_secs=flush_secs,
                    filename_suffix=f".lrscope.{os.getpid()}.{next(_WRITERS)}")
        self.writer = writer
        # tensorboardX names it logdir, torch.utils.tensorboard log_dir.
        found = log_dir if writer is None else getattr(writer, "logdir", None) or getattr(writer, "log_dir", None)
        self.log_dir = None if found is None else os.fspath(found)
        if writer is None:
            self._events = opened(self, lambda: EventFile(os.fspath(log_dir)))
        self._layout_written = False
        self._last_histogram: int | None = None

    @property
    def disabled(self) -> bool:
        return self.writer is None and self._events is None

    def write(self, report: StepReport) -> None:
        if report.skipped or self.disabled:
            return  # (a skipped step: nothing moved and t did not advance; JSONL records it)
        scalars = {tag: value for tag, value in report.scalars(params=self.params).items()
                   if not tag.endswith("/count")}
        histograms = list(self._histograms(report)) if self._histogram_due(report) else []
        if self._events is not None:
            self._write_events(report, scalars, histograms)
        else:
            self._write_to_writer(report, scalars, histograms)
        if histograms:  # (after the write: a write that failed is tried again whole)
            self._last_histogram = report.t

    def _write_events(self, report: StepReport, scalars: dict[str, float],
                      histograms: list[tuple[str, dict[str, Any]]]) -> None:
        """The report as events of one ``EventFile.write``: every scalar in one event (for
        24 groups, 72 tags, a write took 2.4-2.9 ms with tensorboardX's one event per tag,
        0.15 ms with one), then the findings and the histograms."""
        from tensorboardX import summary
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        assert self._events is not None
        wall_time = time.time()
        if not self._layout_written:
            self._events.preamble.append(_record(Event(
                wall_time=wall_time, summary=summary.custom_scalars(layout(report)))))
            self._layout_written = True
        summaries = []
        if scalars:
            summaries.append(Summary(value=[Summary.Value(tag=tag, simple_value=value)
                                            for tag, value in scalars.items()]))
        if report.findings:
            summaries.append(summary.text(*_findings(report)))
        summaries += [summary.histogram_raw(tag, **histogram) for tag, histogram in histograms]
        self._events.write([_record(Event(wall_time=wall_time, step=report.t, summary=one))
                            for one in summaries])

    def _write_to_writer(self, report: StepReport, scalars: dict[str, float],
                         histograms: list[tuple[str, dict[str, Any]]]) -> None:
        if not self._layout_written:
            self.writer.add_custom_scalars(layout(report))
            self._layout_written = True
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=report.t)
        if report.findings:
            self.writer.add_text(*_findings(report), global_step=report.t)
        for tag, histogram in histograms:
            self.writer.add_histogram_raw(tag, global_step=report.t, **histogram)

    def _histogram_due(self, report: StepReport) -> bool:
        has_distributions = any(
            p.effective_lr is not None or p.update_magnitude is not None
            for g in report.groups for p in g.params.values())
        last = self._last_histogram
        return has_distributions and (last is None or report.t - last >= self.histogram_every)

    @staticmethod
    def _histograms(report: StepReport) -> Iterator[tuple[str, dict[str, Any]]]:
        for group in report.groups:
            for name, param in group.params.items():
                for label in ("effective_lr", "update_magnitude"):
                    dist = getattr(param, label)
                    histogram = None if dist is None else log10_histogram(dist)
                    if histogram is not None:
                        yield f"{report.default_prefix}/{group.name}/{name}/log10_{label}", histogram

    def flush(self) -> None:
        """Flush a ``SummaryWriter`` (lrscope's own event files need no flush)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
        elif self.writer is not None:
            if self._owns_writer:
                self.writer.close()
            else:
                self.writer.flush()


def _findings(report: StepReport) -> tuple[str, str]:
    """The tag and Markdown text of the findings that first held at this step."""
    return f"{report.default_prefix}/findings", "\n\n".join(
        f"**{f.severity} `{f.id}`** {f.subject} (steps {f.steps_text()}): {f.message}"
        for f in report.findings)
