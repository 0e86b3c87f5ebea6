"""CSV sink in long ("tidy") form: one row ``step,wall_time,tag,value`` per scalar.

The long form never needs a new column when a metric or a parameter group appears
mid-run (distributions arrive only every ``every`` steps), and it loads straight into
pandas (``df.pivot_table(index="step", columns="tag", values="value")``).  Tags are the
keys of ``report.scalars()``: ``lr-<Optimizer>/<group>/<metric>``.  Rows are appended
and flushed per report, so a killed process leaves every complete row readable.
Skipped steps (``report.skipped``) are not written; the JSONL log keeps them.

>>> import tempfile, numpy as np
>>> from pathlib import Path
>>> from lrscope.report import GroupReport, StepReport
>>> path = Path(tempfile.mkdtemp()) / "lrscope.csv"
>>> sink = CsvSink(path)
>>> sink.write(StepReport(t=1, optimizer="Adam", framework="torch", family="adam",
...                       groups=[GroupReport(name="pg0", lr=1e-3, step_size=3.2e-4)]))
>>> sink.close()
>>> path.read_text().splitlines()[0]
'step,wall_time,tag,value'
>>> path.read_text().splitlines()[2].split(",")[2:]
['lr-Adam/pg0/step_size', '0.00032']
"""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path

from lrscope.report import StepReport
from lrscope.sinks._files import AppendFile

#: File name of the CSV log inside a log directory.
FILE_NAME = "lrscope.csv"
HEADER = ("step", "wall_time", "tag", "value")


class CsvSink:
    """Appends the scalars of each report to ``path``; ``params=True`` adds per-tensor ones."""

    background = True

    def __init__(self, path: str | os.PathLike, *, params: bool = False):
        self.path = Path(path)
        self.params = params
        self._file = AppendFile(self.path)
        if self._file.empty:
            self._file.write(",".join(HEADER) + "\n")

    def write(self, report: StepReport) -> None:
        if report.skipped:
            return  # nothing moved and t did not advance: the JSONL log records these
        buffer = io.StringIO()
        rows = csv.writer(buffer, lineterminator="\n")
        wall_time = f"{time.time():.3f}"
        for tag, value in report.scalars(params=self.params).items():
            rows.writerow((report.t, wall_time, tag, repr(float(value))))
        self._file.write(buffer.getvalue())

    def close(self) -> None:
        self._file.close()
