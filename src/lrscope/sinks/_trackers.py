"""What the tracker sinks (W&B, MLflow, trackio) write: what TensorBoard receives.

One definition of the scalars, distributions and findings text that ``TensorBoardSink``
logs, so that a run reads the same in every tracker.

>>> import numpy as np
>>> from lrscope.report import Distribution, GroupReport, StepReport
>>> group = GroupReport(name="pg0", lr=1e-3, step_size=3e-4,
...                     effective_lr=Distribution.from_array(np.array([1e-4, 3e-4])))
>>> report = StepReport(t=1, optimizer="Adam", framework="torch", family="adam", groups=[group])
>>> sorted(logged_scalars(report))[:3]
['lr-Adam/pg0/effective_lr/max', 'lr-Adam/pg0/effective_lr/mean', 'lr-Adam/pg0/effective_lr/min']
>>> any(tag.endswith("/count") for tag in logged_scalars(report))
False
>>> [tag for tag, _ in distributions(report)]
[]
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from lrscope.report import Distribution, StepReport
from lrscope.sinks.tensorboard import _findings


def logged_scalars(report: StepReport, params: bool = False) -> dict[str, float]:
    """``report.scalars(params=params)`` less the element counts, as TensorBoard logs them."""
    return {tag: value for tag, value in report.scalars(params=params).items()
            if not tag.endswith("/count")}


def distributions(report: StepReport) -> Iterator[tuple[str, Distribution]]:
    """Each tensor's distributions under TensorBoard's histogram tags
    (``<prefix>/<group>/<tensor>/log10_effective_lr``, ``.../log10_update_magnitude``)."""
    for group in report.groups:
        for name, param in group.params.items():
            for label in ("effective_lr", "update_magnitude"):
                dist = getattr(param, label)
                if dist is not None:
                    yield f"{report.default_prefix}/{group.name}/{name}/log10_{label}", dist


def log10_bins(dist: Distribution, max_bins: int, bins_per_decade: int = 10
               ) -> tuple[np.ndarray, np.ndarray] | None:
    """``(counts, edges)`` of log10 of the positive values, at most ``max_bins`` bins
    (neighbours merged), or None when there is none.

    >>> counts, edges = log10_bins(Distribution.from_array([1e-3, 1e-3, 1e-2]), max_bins=4)
    >>> int(counts.sum()), len(edges) == len(counts) + 1, len(counts) <= 4
    (3, True, True)
    """
    edges, counts = dist.histogram(bins_per_decade)
    if counts.size == 0 or counts.sum() == 0:
        return None
    merge = -(-counts.size // max_bins)
    if merge > 1:
        padded = np.zeros(-(-counts.size // merge) * merge, dtype=counts.dtype)
        padded[:counts.size] = counts
        counts = padded.reshape(-1, merge).sum(axis=1)
        edges = np.append(edges[:-1][::merge], edges[-1])
    return counts, np.log10(edges)


def findings_text(report: StepReport) -> tuple[str, str]:
    """The tag and Markdown text of the findings that first held at this step, as in
    TensorBoard."""
    return _findings(report)


def findings_rows(report: StepReport) -> list[list[object]]:
    """The findings of this step as rows ``[t, severity, id, subject, steps, message]``."""
    return [[report.t, f.severity, f.id, f.subject, f.steps_text(), f.message]
            for f in report.findings]


FINDINGS_COLUMNS = ["t", "severity", "id", "subject", "steps", "message"]
