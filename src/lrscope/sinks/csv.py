"""CSV sink in long ("tidy") form: one row ``step,wall_time,tag,value`` per scalar.

The long form never needs a new column when a metric or a parameter group appears
mid-run (distributions arrive only every ``every`` steps), and it loads straight into
pandas (``df.pivot_table(index="step", columns="tag", values="value")``).  Tags are the
keys of ``report.scalars()``: ``lr-<Optimizer>/<group>/<metric>``.  A report's rows are
appended in one system call (see ``AppendFile``): a killed process leaves every complete
row readable, and the next writer cuts a torn last row before appending.  The header is
written by whichever writer finds the file empty, once, however many processes start
together.  Skipped steps (``report.skipped``) are not written; the JSONL log keeps them.

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
from lrscope.sinks._files import AppendFile, opened

#: File name of the CSV log inside a log directory.
FILE_NAME = "lrscope.csv"
HEADER = ("step", "wall_time", "tag", "value")


class CsvSink:
    """Appends the scalars of each report to ``path``; ``params=True`` adds per-tensor ones.

    A path that cannot be opened costs one warning, not an exception: the sink is then
    ``disabled`` and writes nothing.
    """

    background = True

    def __init__(self, path: str | os.PathLike, *, params: bool = False):
        self.path = Path(path)
        self.params = params
        self._file = opened(self, lambda: AppendFile(self.path, header=",".join(HEADER) + "\n"))

    @property
    def disabled(self) -> bool:
        return self._file is None

    def write(self, report: StepReport) -> None:
        if self._file is None or report.skipped:
            return  # (a skipped step: nothing moved and t did not advance; JSONL records it)
        buffer = io.StringIO()
        rows = csv.writer(buffer, lineterminator="\n")
        wall_time = f"{time.time():.3f}"
        for tag, value in report.scalars(params=self.params).items():
            rows.writerow((report.t, wall_time, tag, repr(float(value))))
        self._file.write(buffer.getvalue())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
