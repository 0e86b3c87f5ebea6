"""``WandbSink``: reports into a Weights & Biases run (``pip install 'lrscope[wandb]'``).

What TensorBoard receives, into the run: every scalar of ``report.scalars()`` (less the
element counts) under the same names, the log10 histograms of the distributions as
``wandb.Histogram`` under TensorBoard's histogram tags, and the findings of a step as a
``wandb.Table`` under ``<prefix>/findings``.

**The x-axis is ``lrscope/t``, not W&B's ``step``.**  W&B's ``step`` must only grow: a row
logged at a step below the run's current one is dropped.  Two optimizers each count their
own t (a GAN's generator and discriminator both log t = 1, 2, ...), a run resumed from a
checkpoint goes on from the run's step, and your own ``wandb.log`` calls advance the same
counter, so logging at ``step=t`` would lose rows.  The sink therefore logs without
``step=`` (each report is one committed row, as W&B's Lightning and Hugging Face
integrations do) and carries ``t`` in the row as ``lrscope/t``, declared with
``define_metric("lr-*", step_metric="lrscope/t")`` as the x-axis of lrscope's charts.  The
run's own ``_step`` still counts rows; plot lrscope's series against ``lrscope/t``
(the default for ``lr-*`` charts).

The sink writes on a thread of its own (``SinkGroup``); W&B's ``run.log`` is thread-safe.
"""

from __future__ import annotations

from typing import Any

from lrscope._optional import require
from lrscope.report import StepReport
from lrscope.sinks._trackers import (
    FINDINGS_COLUMNS, distributions, findings_rows, log10_bins, logged_scalars,
)

#: The key carrying each report's t, declared as the x-axis of every ``lr-*`` series.
STEP_METRIC = "lrscope/t"
#: ``wandb.Histogram`` refuses more bins.
MAX_BINS = 512


class WandbSink:
    """Writes reports into ``run``, the active ``wandb.run``, or a run it starts.

    ``run=None`` without options uses ``wandb.run`` if one is active (yours, or your
    framework's logger's) and leaves it open; otherwise it calls ``wandb.init(**init)`` and
    finishes the run it got on ``close()`` if that run is a new one.  ``histogram_every``: steps between histograms (of the steps with
    distributions); ``params=True`` also logs every tensor's scalars, as TensorBoardSink.

    Example (``wandb.init`` options go through)::

        monitor = lrscope.watch(optimizer, sinks=[WandbSink(project="my-project")])
    """

    background = True

    def __init__(self, run: Any = None, *, histogram_every: int = 1, params: bool = False,
                 **init: Any):
        if int(histogram_every) < 1:
            raise ValueError(f"histogram_every must be a positive number of steps, got {histogram_every}")
        self._wandb = require("wandb", "wandb")
        if run is not None and init:
            raise ValueError(f"WandbSink: give a run or wandb.init options ({', '.join(init)}), not both")
        self._owns_run = False
        if run is None:
            active = self._wandb.run
            if init or active is None:
                run = self._wandb.init(**init)  # (W&B's reinit setting decides about an active run)
                self._owns_run = run is not active
            else:
                run = active
        self.run = run
        self.run.define_metric(STEP_METRIC)
        self.run.define_metric("lr-*", step_metric=STEP_METRIC)
        self.histogram_every = int(histogram_every)
        self.params = params
        self._last_histogram: dict[str, int] = {}

    def write(self, report: StepReport) -> None:
        if report.skipped:
            return  # (nothing moved and t did not advance; JSONL records it)
        row: dict[str, Any] = {STEP_METRIC: report.t, **logged_scalars(report, self.params)}
        last = self._last_histogram.get(report.default_prefix)  # (optimizers sharing the sink)
        if last is None or report.t - last >= self.histogram_every:
            histograms = {tag: self._wandb.Histogram(np_histogram=bins)
                          for tag, dist in distributions(report)
                          if (bins := log10_bins(dist, MAX_BINS)) is not None}
            if histograms:
                row.update(histograms)
                self._last_histogram[report.default_prefix] = report.t
        if report.findings:
            row[f"{report.default_prefix}/findings"] = self._wandb.Table(
                columns=FINDINGS_COLUMNS, data=findings_rows(report))
        self.run.log(row)

    def close(self) -> None:
        """Finishes the run if the sink started it."""
        if self._owns_run:
            self.run.finish()
