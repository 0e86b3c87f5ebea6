"""What the rules read: one optimizer step as the report (live) or the logs (offline) hold it.

The rules never see a ``StepReport``, a JSONL record or TensorBoard scalars directly, but
the ``Step`` built from any of them, so that ``lrscope check`` and a live monitor judge the
same numbers.  A statistic the source does not carry is None: TensorBoard logs have no
element counts and no tensor shapes, and per-tensor statistics only with the TensorBoard
sink's ``params=True``; the JSONL log has everything the report has.

>>> import numpy as np
>>> from lrscope.report import Distribution, GroupReport, ParamReport, StepReport
>>> w = ParamReport(name="w", shape=(2, 2), update_norm=0.01, param_norm=1.0,
...                 effective_lr=Distribution.from_array(np.full(4, 1e-3), eps_dominated=1))
>>> report = StepReport(t=1, optimizer="Adam", framework="torch", family="adam",
...                     groups=[GroupReport.combine({"w": w}, name="pg0", lr=1e-3, step_size=3e-4)])
>>> step = from_report(report)
>>> step.prefix, step.groups[0].params["w"].eps_dominated, step.groups[0].stats.update_to_param
('lr-Adam', 0.25, 0.01)
>>> from_record(report.to_dict()).groups[0].params["w"].shape
(2, 2)
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

from lrscope.report import ParamReport, StepReport, tag_prefix

#: Group metrics that are not family extras (``GroupReport.metrics``).
_GROUP_METRICS = {"lr", "step_size", "weight_decay_rate", "eps_dominated", "update_norm",
                  "param_norm", "update_to_param"}
_DISTRIBUTIONS = ("effective_lr", "update_magnitude")


@dataclass
class Stats:
    """The measured statistics of one tensor, or of a group's tensors together, at one step.

    ``eta_min``/``eta_max`` are those of the effective lr (of |update| for optimizers
    measured empirically, ``empirical``); ``nonfinite`` counts its NaN/Inf elements.
    """

    count: int | None = None
    eps_dominated: float | None = None
    nonfinite: float | None = None
    eta_min: float | None = None
    eta_max: float | None = None
    update_norm: float | None = None
    param_norm: float | None = None
    update_to_param: float | None = None
    shape: tuple[int, ...] | None = None
    empirical: bool = False

    @property
    def update_rms(self) -> float | None:
        """The root mean square of the update per element, ||delta theta|| / sqrt(count)."""
        if self.update_norm is None or not self.count:
            return None
        return self.update_norm / math.sqrt(self.count)


@dataclass
class GroupStep:
    """One parameter group at one step; ``stats`` is None on steps without distributions.
    A scalar the source does not know is NaN (SPEC: unknown is NaN, never a guess)."""

    name: str
    lr: float
    step_size: float
    weight_decay_rate: float
    extra: dict[str, float] = field(default_factory=dict)
    stats: Stats | None = None
    params: dict[str, Stats] = field(default_factory=dict)


@dataclass
class Step:
    """One optimizer step of one monitored optimizer (``prefix``, the tags' ``lr-<name>``)."""

    prefix: str
    t: int
    groups: list[GroupStep]
    optimizer: str = ""
    family: str | None = None
    skipped: bool = False
    #: Findings recorded in the log by a live monitor (dicts, ``Finding.to_dict``).
    findings: list[dict[str, Any]] = field(default_factory=list)

    @property
    def measured(self) -> bool:
        """Whether this step carries distributions (every ``every`` steps)."""
        return any(g.stats is not None for g in self.groups)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _stats_of_report(p: ParamReport) -> Stats | None:
    dist = p.effective_lr if p.effective_lr is not None else p.update_magnitude
    if dist is None and p.update_norm is None:
        return None
    stats = Stats(update_norm=p.update_norm, param_norm=p.param_norm, update_to_param=p.update_to_param,
                  shape=tuple(p.shape) if p.shape else None, empirical=p.effective_lr is None)
    if dist is not None:
        stats.count, stats.nonfinite = dist.count, float(dist.nonfinite)
        stats.eps_dominated = dist.eps_dominated
        stats.eta_min, stats.eta_max = dist.min, dist.max
    return stats


def from_report(report: StepReport) -> Step:
    """The Step of a live ``StepReport`` (nothing is copied or computed but a few attributes)."""
    groups = []
    for g in report.groups:
        params = {name: s for name, p in g.params.items() if (s := _stats_of_report(p)) is not None}
        stats = _stats_of_report(g)
        if stats is not None:
            stats.shape = None  # a group has no shape
        groups.append(GroupStep(g.name, float(g.lr), float(g.step_size), float(g.weight_decay_rate),
                                dict(g.extra), stats, params))
    return Step(report.default_prefix, int(report.t), groups, report.optimizer, report.family,
                report.skipped)


def _stats_of_entry(entry: dict[str, Any], shape: Any = None) -> Stats | None:
    """Stats of a JSONL record's group or tensor entry (``StepReport.to_dict``).  JSON has no
    NaN: a norm written as null beside a distribution was not finite."""
    label = next((d for d in _DISTRIBUTIONS if entry.get(d)), None)
    summary = entry.get(label) if label else None
    if summary is None and entry.get("update_norm") is None:
        return None
    # An update norm written as null may be absent (the family computes none) or NaN.
    stats = Stats(update_norm=_float(entry.get("update_norm")),
                  param_norm=_or(entry.get("param_norm"), math.nan if summary is not None else None),
                  update_to_param=_float(entry.get("update_to_param")),
                  shape=tuple(shape) if shape is not None else None,
                  empirical=label == "update_magnitude")
    if summary is not None:
        stats.count = None if summary.get("count") is None else int(summary["count"])
        stats.nonfinite = _float(summary.get("nonfinite"))
        stats.eps_dominated = _float(summary.get("eps_dominated"))
        stats.eta_min, stats.eta_max = _float(summary.get("min")), _float(summary.get("max"))
    return stats


def _or(value: Any, default: float | None) -> float | None:
    return default if value is None else float(value)


def from_record(record: dict[str, Any]) -> Step:
    """The Step of one JSONL record (``StepReport.to_dict`` plus ``wall_time``)."""
    groups = []
    for g in record.get("groups", []):
        params = {}
        for name, entry in (g.get("params") or {}).items():
            stats = _stats_of_entry(entry, entry.get("shape"))
            if stats is not None:
                params[name] = stats
        groups.append(GroupStep(str(g.get("name")), _nan(g.get("lr")), _nan(g.get("step_size")),
                                _nan(g.get("weight_decay_rate")),
                                {k: _nan(v) for k, v in (g.get("extra") or {}).items()},
                                _stats_of_entry(g), params))
    return Step(tag_prefix(record.get("optimizer", ""), record.get("name")), int(record["t"]), groups,
                str(record.get("optimizer", "")), record.get("family"), bool(record.get("skipped")),
                list(record.get("findings") or []))


def _nan(value: Any) -> float:
    return math.nan if value is None else float(value)


#: (group key ``lr-<Optimizer>/<group>``, tensor name or None, metric, step, value): a
#: TensorBoard scalar with its tag split by ``split_tag``.
Point = tuple[str, "str | None", str, int, "float | None"]


def split_tag(tag: str) -> tuple[str, str | None, str] | None:
    """A TensorBoard tag as the TensorBoard sink writes it, split into (group key, tensor or
    None, metric); None for a tag that is not lrscope's.  A tensor's name may hold slashes.

    >>> split_tag("lr-Adam/pg0/dense/kernel/effective_lr/p50")
    ('lr-Adam/pg0', 'dense/kernel', 'effective_lr/p50')
    >>> split_tag("lr-NAdam/pg1/step_size_grad"), split_tag("loss")
    (('lr-NAdam/pg1', None, 'step_size_grad'), None)
    """
    parts = tag.split("/")
    if len(parts) < 3 or not parts[0].startswith("lr-"):
        return None
    rest = parts[2:]
    metric_length = 2 if len(rest) >= 2 and rest[-2] in _DISTRIBUTIONS else 1
    return "/".join(parts[:2]), "/".join(rest[:-metric_length]) or None, "/".join(rest[-metric_length:])


def from_points(points: Iterable[Point]) -> list[Step]:
    """The Steps of TensorBoard scalars, in order of (t, prefix).  Nothing there says the
    optimizer's family or the tensors' shapes or sizes: those stay None."""
    table: dict[tuple[str, int], dict[str, dict[str | None, dict[str, float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(dict)))
    for key, param, metric, t, value in points:
        if value is None:
            continue
        prefix, _, group = key.partition("/")
        table[(prefix, int(t))][group][param][metric] = float(value)
    steps = []
    for (prefix, t), groups in sorted(table.items(), key=lambda item: (item[0][1], item[0][0])):
        group_steps = []
        for name, entries in groups.items():
            own = entries.get(None, {})
            params = {p: s for p, m in entries.items() if p is not None and (s := _stats_of_metrics(m))}
            extra = {k: v for k, v in own.items() if "/" not in k and k not in _GROUP_METRICS}
            group_steps.append(GroupStep(name, own.get("lr", math.nan), own.get("step_size", math.nan),
                                         own.get("weight_decay_rate", math.nan), extra,
                                         _stats_of_metrics(own), params))
        steps.append(Step(prefix, t, group_steps, optimizer=prefix.removeprefix("lr-")))
    return steps


def _stats_of_metrics(metrics: dict[str, float]) -> Stats | None:
    label = next((d for d in _DISTRIBUTIONS if f"{d}/max" in metrics), None)
    if label is None and "update_to_param" not in metrics:
        return None
    get = metrics.get
    count = get(f"{label}/count")
    return Stats(count=None if count is None else int(count), eps_dominated=get("eps_dominated"),
                 nonfinite=get(f"{label}/nonfinite"), eta_min=get(f"{label}/min"),
                 eta_max=get(f"{label}/max"), update_norm=get("update_norm"),
                 param_norm=get("param_norm"), update_to_param=get("update_to_param"),
                 empirical=label == "update_magnitude")
