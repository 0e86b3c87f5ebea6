"""JSONL sink: one JSON object per report, appended and flushed line by line.

Each line is ``report.to_dict()`` plus ``wall_time`` (Unix seconds).  The file is strict
JSON: non-finite floats (the min of an empty distribution, an update ratio of a zero
tensor) are written as ``null``.  Each line is appended in one system call (see
``AppendFile``): a process killed at any moment leaves every complete line readable
(``lrscope.logs.read_jsonl`` skips a torn last line), and the next writer of the file cuts
a torn last line before appending, so no record is lost by being glued onto it.

>>> import tempfile, numpy as np
>>> from pathlib import Path
>>> from lrscope.logs import read_jsonl
>>> from lrscope.report import Distribution, GroupReport, StepReport
>>> path = Path(tempfile.mkdtemp()) / "lrscope.jsonl"
>>> group = GroupReport(name="pg0", lr=1e-3, step_size=3.2e-4,
...                     effective_lr=Distribution.from_array(np.array([1e-4, 2e-4])))
>>> sink = JsonlSink(path)
>>> sink.write(StepReport(t=1, optimizer="Adam", framework="torch", family="adam",
...                       groups=[group]))
>>> sink.close()
>>> [record["groups"][0]["step_size"] for record in read_jsonl(path)]
[0.00032]
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from lrscope.report import StepReport
from lrscope.sinks._files import AppendFile, opened

#: File name of the JSONL log inside a log directory.
FILE_NAME = "lrscope.jsonl"


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN/Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def encode(report: StepReport, wall_time: float | None = None, tensor_sketches: bool = True) -> str:
    """One JSONL line (with its newline) for ``report``; without ``tensor_sketches`` each
    tensor keeps its summary (count, extremes, quantiles, ...) but not its sketch, and only
    the groups' sketches remain."""
    record = {"wall_time": time.time() if wall_time is None else wall_time, **report.to_dict()}
    if not tensor_sketches:
        for group in record["groups"]:
            for entry in group["params"].values():
                for label in ("effective_lr", "update_magnitude"):
                    if entry[label] is not None:
                        entry[label].pop("sketch")
    return json.dumps(_strict(record), allow_nan=False, separators=(",", ":")) + "\n"


class JsonlSink:
    """Appends one line per report to ``path`` (created with its directories).

    Every tensor's sketch makes a measured step of an 82-tensor model about 316 KB;
    ``tensor_sketches=False`` keeps the tensors' summaries and the groups' sketches only,
    about 44 KB (quantiles of the groups can still be merged, those of any set of tensors
    no longer).  A path that cannot be opened costs one warning, not an exception: the sink
    is then ``disabled`` and writes nothing.
    """

    background = True

    def __init__(self, path: str | os.PathLike, *, tensor_sketches: bool = True):
        self.path = Path(path)
        self.tensor_sketches = tensor_sketches
        self._file = opened(self, lambda: AppendFile(self.path))

    @property
    def disabled(self) -> bool:
        return self._file is None

    def write(self, report: StepReport) -> None:
        if self._file is not None:
            self._file.write(encode(report, tensor_sketches=self.tensor_sketches))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
