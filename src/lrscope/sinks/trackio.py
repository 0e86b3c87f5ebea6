"""``TrackioSink``: reports into a trackio run (``pip install 'lrscope[trackio]'``).

What TensorBoard receives, into the run: every scalar of ``report.scalars()`` (less the
element counts) under the same names at ``step=t``, the log10 histograms of the
distributions as ``trackio.Histogram`` under TensorBoard's histogram tags, and the findings
of a step as ``trackio.Markdown`` under ``<prefix>/findings``.

trackio keeps every logged row with its step and asks no order of the steps, so two
optimizers (each with its own t) and a resumed run log at their t.  trackio writes to a
local SQLite database (``TRACKIO_DIR``, by default ``~/.cache/huggingface/trackio``) unless
``trackio.init`` is given a Space or a server.
"""

from __future__ import annotations

from typing import Any

from lrscope._optional import require
from lrscope.report import StepReport
from lrscope.sinks._trackers import distributions, findings_text, log10_bins, logged_scalars

#: ``trackio.Histogram`` keeps at most this many bins.
MAX_BINS = 512


class TrackioSink:
    """Writes reports into ``run``, trackio's current run, or a run it starts.

    ``run=None`` uses the run of the latest ``trackio.init`` in this context if there is one
    and leaves it open; without one it calls ``trackio.init(**init)`` (``project=`` is
    needed) and finishes that run on ``close()``.  ``histogram_every`` and ``params`` as in
    ``TensorBoardSink``.  The sink writes on a thread of its own, to the run object.
    """

    background = True

    def __init__(self, run: Any = None, *, histogram_every: int = 1, params: bool = False,
                 **init: Any):
        if int(histogram_every) < 1:
            raise ValueError(f"histogram_every must be a positive number of steps, got {histogram_every}")
        self._trackio = require("trackio", "trackio")
        if run is not None and init:
            raise ValueError(f"TrackioSink: give a run or trackio.init options ({', '.join(init)}), not both")
        current = None if run is not None or init else self._trackio.context_vars.current_run.get()
        self._owns_run = run is None and current is None
        self.run = run or current or self._trackio.init(**init)
        self.histogram_every = int(histogram_every)
        self.params = params
        self._last_histogram: dict[str, int] = {}

    def write(self, report: StepReport) -> None:
        if report.skipped:
            return  # (nothing moved and t did not advance; JSONL records it)
        row: dict[str, Any] = dict(logged_scalars(report, self.params))
        last = self._last_histogram.get(report.default_prefix)  # (optimizers sharing the sink)
        if last is None or report.t - last >= self.histogram_every:
            histograms = {tag: self._trackio.Histogram(np_histogram=bins)
                          for tag, dist in distributions(report)
                          if (bins := log10_bins(dist, MAX_BINS)) is not None}
            if histograms:
                row.update(histograms)
                self._last_histogram[report.default_prefix] = report.t
        if report.findings:
            tag, text = findings_text(report)
            row[tag] = self._trackio.Markdown(text)
        self.run.log(row, step=report.t)

    def close(self) -> None:
        """Finishes the run if the sink started it."""
        if self._owns_run:
            self.run.finish()
