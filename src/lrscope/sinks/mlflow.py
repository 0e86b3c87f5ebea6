"""``MlflowSink``: reports into an MLflow run (``pip install 'lrscope[mlflow]'``).

What TensorBoard receives, as far as MLflow has a place for it: every scalar of
``report.scalars()`` (less the element counts) as a metric at ``step=t``, and the findings
as Markdown in the run's artifact ``lrscope/<prefix>/findings.md`` (``mlflow.log_text``,
rewritten with each new finding).  MLflow has no histogram type: the distributions are in
the metrics as their quantiles, min, max and mean, and their histograms are not logged.

MLflow keeps each metric's own history, so two optimizers (each with its own t) and a
resumed run log at their t without conflict.

**Metric names.**  MLflow accepts letters, digits, ``_ - . / :`` and spaces (no colon on
Windows), no empty or ``.``/``..`` path segments and at most 250 characters.  lrscope's own
names always pass; a group or tensor name of yours may not: every other character becomes
``_``, an empty, ``.`` or ``..`` segment becomes ``_``, and a name over 250 characters keeps
its first 241 and a hash of the whole (``mlflow_name``).
"""

from __future__ import annotations

import hashlib
import os
import re
import time

from lrscope._optional import require
from lrscope.report import StepReport
from lrscope.sinks._trackers import findings_text, logged_scalars

_INVALID = re.compile(r"[^/\w.\- :]" if os.name != "nt" else r"[^/\w.\- ]")
#: MLflow's longest metric name.
MAX_NAME = 250


def mlflow_name(tag: str) -> str:
    """``tag`` as a valid MLflow metric name (see the module docstring).

    >>> mlflow_name("lr-Adam/pg0/effective_lr/p50")
    'lr-Adam/pg0/effective_lr/p50'
    >>> mlflow_name("lr-Adam/decoder (frozen)/step_size"), mlflow_name("lr-Adam//../lr")
    ('lr-Adam/decoder _frozen_/step_size', 'lr-Adam/_/_/lr')
    >>> len(mlflow_name("lr-SGD/" + "x" * 300))
    250
    """
    name = _INVALID.sub("_", tag)
    name = "/".join("_" if part in ("", ".", "..") else part for part in name.split("/"))
    if len(name) > MAX_NAME:
        name = name[:MAX_NAME - 9] + "~" + hashlib.sha1(tag.encode()).hexdigest()[:8]
    return name


class MlflowSink:
    """Writes reports into the MLflow run ``run_id``, the active run, or a run it creates.

    ``run_id=None`` uses ``mlflow.active_run()`` if there is one (yours, or your framework's
    logger's) and leaves it open; without one it creates a run in the current experiment
    (``mlflow.set_experiment``, ``MLFLOW_EXPERIMENT_NAME``) and ends it on ``close()``.
    The tracking URI is the current one (``mlflow.set_tracking_uri``, ``MLFLOW_TRACKING_URI``)
    or ``tracking_uri``.  ``params=True`` also logs every tensor's scalars.

    The sink writes on a thread of its own through an ``MlflowClient`` bound to the run
    (MLflow's active run is per thread).
    """

    background = True

    def __init__(self, run_id: str | None = None, *, tracking_uri: str | None = None,
                 params: bool = False, run_name: str | None = None):
        mlflow = require("mlflow", "mlflow")
        from mlflow.entities import Metric

        self._metric = Metric
        self.client = mlflow.tracking.MlflowClient(tracking_uri)
        active = mlflow.active_run() if run_id is None else None
        self._owns_run = run_id is None and active is None
        if active is not None:
            run_id = active.info.run_id
        elif run_id is None:
            from mlflow.tracking.fluent import _get_experiment_id

            experiment = _get_experiment_id() or "0"
            run_id = self.client.create_run(experiment, run_name=run_name).info.run_id
        self.run_id: str = run_id
        self.params = params
        self._findings: dict[str, list[str]] = {}

    def write(self, report: StepReport) -> None:
        if report.skipped:
            return  # (nothing moved and t did not advance; JSONL records it)
        timestamp = int(time.time() * 1000)
        metrics = [self._metric(key=mlflow_name(tag), value=value, timestamp=timestamp, step=report.t)
                   for tag, value in logged_scalars(report, self.params).items()]
        self.client.log_batch(self.run_id, metrics=metrics)
        if report.findings:
            prefix = report.default_prefix
            sections = self._findings.setdefault(prefix, [])
            sections.append(f"## Step {report.t}\n\n{findings_text(report)[1]}")
            self.client.log_text(self.run_id, "\n\n".join(sections) + "\n",
                                 f"lrscope/{mlflow_name(prefix)}/findings.md")

    def close(self) -> None:
        """Ends the run if the sink created it."""
        if self._owns_run:
            self.client.set_terminated(self.run_id)
