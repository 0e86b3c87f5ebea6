"""Whole-model reports from the reports of several processes (the ranks of a distributed run).

Each rank measures only the elements it counts (its shards of a sharded tensor; a
replicated tensor on one rank only), so merging is a union with nothing counted twice:
tensors of the same name are one tensor in shards, whose sketches merge exactly (the
same buckets, counts added; min/max/mean and norms exact up to float rounding), and each
group's distribution is rebuilt from its tensors.  ``lrscope merge`` does it offline from
per-rank JSONL logs (``merge_logs``, ``merge_reports``); ``lrscope.watch`` does it live
(``lrscope.torch.distributed``) with two element-wise all-reduces of packed vectors
(``PackedStep``) instead of sending the reports themselves.

>>> import numpy as np
>>> from lrscope.report import Distribution, GroupReport, ParamReport, StepReport
>>> def rank(values, norm):
...     param = ParamReport("w", (4,), effective_lr=Distribution.from_array(np.array(values)),
...                         update_norm=norm, param_norm=1.0)
...     group = GroupReport.combine({"w": param}, name="pg0", lr=1e-3, step_size=3e-4)
...     return StepReport(t=5, optimizer="AdamW", framework="torch", family="adamw", groups=[group])
>>> whole = merge_reports([rank([1e-3, 2e-3], 0.3), rank([3e-3, 4e-3], 0.4)])
>>> w = whole.groups[0].params["w"]
>>> w.effective_lr.count, w.effective_lr.max, round(w.update_norm, 6), whole.groups[0].effective_lr.count
(4, 0.004, 0.5, 4)
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from lrscope.report import Distribution, GroupReport, ParamReport, StepReport
from lrscope.stats import LogSketch


def _union_norm(norms: list[float | None]) -> float | None:
    """The norm of a tensor from its shards' norms (None if any is unknown)."""
    if any(n is None for n in norms):
        return None
    return math.sqrt(sum(n * n for n in norms))  # type: ignore[operator]


def merge_params(shards: Sequence[ParamReport]) -> ParamReport:
    """One tensor's report from the reports of its shards (disjoint element sets)."""
    first = shards[0]
    merged = ParamReport(first.name, first.shape)
    for label in ("effective_lr", "update_magnitude"):
        dists = [getattr(s, label) for s in shards if getattr(s, label) is not None]
        if dists:
            setattr(merged, label, Distribution.union(dists))
    merged.update_norm = _union_norm([s.update_norm for s in shards])
    merged.param_norm = _union_norm([s.param_norm for s in shards])
    return merged


def merge_reports(reports: Sequence[StepReport], notes: Iterable[str] = ()) -> StepReport:
    """The report of the whole model from the ranks' reports of one step.

    Replicas (``ParamReport.replica``: a copy that another rank counts) are left out.
    Groups are matched by position (every rank has the same param groups, possibly with
    no tensor of its own in some); a group's scalars are rank 0's (the ranks apply the
    same lr and step size: a difference is named in the notes).  Raises ValueError when
    the reports are not of one step (different ``t``) or of one optimizer.
    """
    first = reports[0]
    if len({r.t for r in reports}) > 1 or len({len(r.groups) for r in reports}) > 1:
        raise ValueError(
            "lrscope: the ranks' reports are not of one step: t = "
            + ", ".join(f"{r.t} (rank {i})" for i, r in enumerate(reports))
            + "; every rank must watch its optimizer with the same every= and step together")
    merged_notes = list(dict.fromkeys([*(n for r in reports for n in r.notes), *notes]))
    groups = []
    for index, group in enumerate(first.groups):
        by_name: dict[str, list[ParamReport]] = {}
        for report in reports:
            for name, param in report.groups[index].params.items():
                if not param.replica:
                    by_name.setdefault(name, []).append(param)
        params = {name: merge_params(shards) for name, shards in by_name.items()}
        for other, report in enumerate(reports[1:], start=1):
            theirs = report.groups[index]
            if not _same(theirs.step_size, group.step_size) or not _same(theirs.lr, group.lr):
                merged_notes.append(f"group {group.name}: rank {other} used lr {theirs.lr:g} and step "
                                    f"size {theirs.step_size:g}, rank 0 {group.lr:g} and "
                                    f"{group.step_size:g}; the report shows rank 0's")
        groups.append(_whole_group(group, params))
    return _whole_report(first, groups, merged_notes)


def _whole_group(group: GroupReport, params: dict[str, ParamReport]) -> GroupReport:
    """``group``'s scalars (rank 0's) over the merged ``params``."""
    return GroupReport.combine(params, name=group.name, lr=group.lr, step_size=group.step_size,
                               weight_decay_rate=group.weight_decay_rate, extra=dict(group.extra),
                               lr_source=group.lr_source)


def _whole_report(first: StepReport, groups: list[GroupReport], notes: list[str]) -> StepReport:
    return StepReport(t=first.t, optimizer=first.optimizer, framework=first.framework,
                      family=first.family, groups=groups, skipped=first.skipped,
                      empirical=first.empirical, notes=notes, name=first.name)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0)


# -- live: the ranks' reports packed into vectors that all-reduce element-wise ---------------

_LABELS = ("effective_lr", "update_magnitude")
#: Reduced by MIN (a maximum as its negative).  Head: the step and the number of groups,
#: each twice (so that MIN gives both their lowest and highest value over the ranks),
#: whether a rank's report has tensors the layout lacks, then one flag per rank: 0 where that
#: rank could not measure.  Per group: lr and step size, lowest and highest.  Per
#: distribution: min, max, and the first and last bucket key of each sign's store.
_HEAD = ("t", "-t", "groups", "-groups", "-stale")
_GROUP_EXTREMES = ("lr", "-lr", "step_size", "-step_size")
_DIST_EXTREMES = ("min", "-max", "positive_low", "-positive_high", "negative_low", "-negative_high")
#: Reduced by SUM.  Per tensor: on how many ranks it is reported, its squared norms, and on
#: how many ranks each norm is known.  Per distribution: the same for the distribution, its
#: counts and sums, then (after every tensor's) its bucket counts over the agreed key spans.
_PARAM_SUMS = ("present", "update_sq", "update_known", "param_sq", "param_known")
_DIST_SUMS = ("present", "count", "zeros", "nan", "posinf", "neginf", "eps_dominated", "eps_known",
              "sum", "sum_squares")
_SIGNS = ("positive", "negative")


@dataclass
class Layout:
    """The tensors (``(group index, name)`` with their shapes) and distributions
    (``(group index, name, label)``) of the ranks' reports, in an order every rank holds:
    the positions of their entries in the packed vectors."""

    groups: int = 0
    shapes: dict[tuple[int, str], tuple[int, ...]] = field(default_factory=dict)
    dists: list[tuple[int, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.param_index = {key: i for i, key in enumerate(self.shapes)}
        self.dist_index = {key: i for i, key in enumerate(self.dists)}

    @classmethod
    def of(cls, report: StepReport) -> Layout:
        """The layout of one rank's report."""
        shapes: dict[tuple[int, str], tuple[int, ...]] = {}
        dists = []
        for index, group in enumerate(report.groups):
            for name, param in group.params.items():
                shapes[(index, name)] = tuple(param.shape)
                dists += [(index, name, label) for label in _LABELS if getattr(param, label) is not None]
        return cls(len(report.groups), shapes, dists)

    @classmethod
    def union(cls, layouts: Sequence[Layout]) -> Layout:
        """The layout of every rank's report (each rank's in rank order: the same on every rank)."""
        shapes: dict[tuple[int, str], tuple[int, ...]] = {}
        for layout in layouts:
            for key, shape in layout.shapes.items():
                shapes.setdefault(key, shape)
        dists = dict.fromkeys(key for layout in layouts for key in layout.dists)
        return cls(max(layout.groups for layout in layouts), shapes, list(dists))

    def covers(self, report: StepReport) -> bool:
        """Whether every tensor and distribution of ``report`` has its place here."""
        if len(report.groups) > self.groups:
            return False
        return all((index, name) in self.param_index
                   and all((index, name, label) in self.dist_index
                           for label in _LABELS if getattr(param, label) is not None)
                   for index, group in enumerate(report.groups) for name, param in group.params.items())


def _high(value: float) -> float:
    """A scalar compared across ranks by MIN: unknown (NaN) reads as +inf, never as a value."""
    return math.inf if math.isnan(value) else float(value)


class PackedStep:
    """One rank's part of a measured step, packed for the two all-reduces that make the whole
    model's report on rank 0 (``lrscope.torch.distributed``).

    ``extremes()`` (reduced by MIN) checks that the ranks are at the same step with the same
    groups and all measured, says whether the ``layout`` must grow first (a tensor new to
    it), and agrees on each distribution's min, max and span of bucket keys; ``sums(agreed)``
    (reduced by SUM) then adds up counts, sums, squared norms and bucket counts over those
    spans.  Both vectors' lengths depend on the numbers of tensors and buckets, never on the
    tensors' sizes; ``whole(sums)`` decodes the result.

    >>> def rank(values, norm):
    ...     param = ParamReport("w", (4,), effective_lr=Distribution.from_array(np.array(values)),
    ...                         update_norm=norm, param_norm=1.0)
    ...     group = GroupReport.combine({"w": param}, name="pg0", lr=1e-3, step_size=3e-4)
    ...     return StepReport(t=5, optimizer="AdamW", framework="torch", family="adamw", groups=[group])
    >>> reports = [rank([1e-3, 2e-3], 0.3), rank([3e-3, 4e-3], 0.4)]
    >>> layout = Layout.union([Layout.of(r) for r in reports])
    >>> packed = [PackedStep(r, layout, rank=i, world=2) for i, r in enumerate(reports)]
    >>> agreed = packed[0].agree(np.minimum(*(p.extremes() for p in packed)))
    >>> whole = packed[0].whole(sum(p.sums(agreed) for p in packed), agreed)
    >>> whole.groups[0].params["w"].effective_lr.count, round(whole.groups[0].update_norm, 6)
    (4, 0.5)
    >>> whole.groups[0].effective_lr.sketch == merge_reports(reports).groups[0].effective_lr.sketch
    True
    """

    def __init__(self, report: StepReport, layout: Layout, *, rank: int, world: int, complete: bool = True):
        self.report, self.layout, self.rank, self.world = report, layout, rank, world
        self.complete = complete

    def _dists(self) -> Iterable[tuple[int, Distribution]]:
        """(position in the layout, distribution) of this rank's distributions it has a place for."""
        for index, group in enumerate(self.report.groups):
            for name, param in group.params.items():
                for label in _LABELS:
                    dist = getattr(param, label)
                    position = self.layout.dist_index.get((index, name, label))
                    if dist is not None and position is not None:
                        yield position, dist

    def extremes(self) -> np.ndarray:
        """This rank's vector for the MIN all-reduce."""
        layout, report = self.layout, self.report
        head = [report.t, -report.t, len(report.groups), -len(report.groups), -float(not layout.covers(report))]
        ranks = np.ones(self.world)
        ranks[self.rank] = float(self.complete)
        groups = np.full((layout.groups, len(_GROUP_EXTREMES)), math.inf)
        for index, group in enumerate(report.groups[:layout.groups]):
            lr, step_size = _high(group.lr), _high(group.step_size)
            groups[index] = (lr, -lr, step_size, -step_size)
        dists = np.full((len(layout.dists), len(_DIST_EXTREMES)), math.inf)
        for position, dist in self._dists():
            sketch = dist.sketch
            row = [sketch.min, -sketch.max]
            for sign in _SIGNS:
                keys = getattr(sketch, sign)[0]
                row += [keys[0], -keys[-1]] if keys.size else [math.inf, math.inf]
            dists[position] = row
        return np.concatenate([head, ranks, groups.ravel(), dists.ravel()]).astype(np.float64)

    def agree(self, reduced: np.ndarray) -> Agreed:
        """What the ranks agree on, from the reduced ``extremes()``; ValueError (on every rank
        alike) when they are not at the same step or do not have the same param groups."""
        t_low, t_high, groups_low, groups_high, stale = reduced[:len(_HEAD)] * (1, -1, 1, -1, -1)
        if t_low != t_high or groups_low != groups_high:
            raise ValueError(
                f"lrscope: the ranks' measured steps do not match: t from {t_low:g} to {t_high:g}, "
                f"{groups_low:g} to {groups_high:g} param group(s); every rank must watch its "
                "optimizer with the same every= and step it the same number of times")
        at = len(_HEAD) + self.world
        missing = [rank for rank, done in enumerate(reduced[len(_HEAD):at]) if not done]
        groups = reduced[at:at + self.layout.groups * len(_GROUP_EXTREMES)].reshape(-1, len(_GROUP_EXTREMES))
        dists = reduced[at + groups.size:].reshape(-1, len(_DIST_EXTREMES))
        return Agreed(stale=bool(stale), missing=missing, groups=groups * (1, -1, 1, -1),
                      dists=dists * (1, -1, 1, -1, 1, -1))

    def sums(self, agreed: Agreed) -> np.ndarray:
        """This rank's vector for the SUM all-reduce, laid out by ``agreed``'s key spans."""
        params = np.zeros((len(self.layout.shapes), len(_PARAM_SUMS)))
        for index, group in enumerate(self.report.groups):
            for name, param in group.params.items():
                update, norm = param.update_norm, param.param_norm
                params[self.layout.param_index[(index, name)]] = (
                    1, 0 if update is None else update * update, update is not None,
                    0 if norm is None else norm * norm, norm is not None)
        dists = np.zeros((len(self.layout.dists), len(_DIST_SUMS)))
        buckets = np.zeros(agreed.buckets)
        for position, dist in self._dists():
            s, eps = dist.sketch, dist.eps_dominated_count
            dists[position] = (1, s.count, s.zeros, s.nan, s.posinf, s.neginf, eps or 0, eps is not None,
                               s.sum, s.sum_squares)
            for sign, (low, start) in zip(_SIGNS, agreed.spans[position]):
                keys, counts = getattr(s, sign)
                buckets[start + keys - low] = counts
        return np.concatenate([params.ravel(), dists.ravel(), buckets])

    def whole(self, reduced: np.ndarray, agreed: Agreed) -> StepReport:
        """The whole model's report from the reduced ``sums()`` (this rank's scalars and notes)."""
        layout = self.layout
        params_end = len(layout.shapes) * len(_PARAM_SUMS)
        params = reduced[:params_end].reshape(-1, len(_PARAM_SUMS))
        dists = reduced[params_end:params_end + len(layout.dists) * len(_DIST_SUMS)].reshape(-1, len(_DIST_SUMS))
        buckets = reduced[params_end + dists.size:]
        merged: list[dict[str, ParamReport]] = [{} for _ in range(layout.groups)]
        for ((index, name), shape), (present, update_sq, update_known, param_sq, param_known) in zip(
                layout.shapes.items(), params):
            if present:
                merged[index][name] = ParamReport(
                    name, shape, update_norm=math.sqrt(update_sq) if update_known == present else None,
                    param_norm=math.sqrt(param_sq) if param_known == present else None)
        for position, ((index, name, label), row) in enumerate(zip(layout.dists, dists)):
            present, count, zeros, nan, posinf, neginf, eps, eps_known, total, squares = row
            param = merged[index].get(name)
            if not present or param is None:
                continue
            stores = []
            for sign, (low, start), size in zip(_SIGNS, agreed.spans[position], agreed.sizes[position]):
                counts = buckets[start:start + size]
                occupied = np.flatnonzero(counts)
                stores.append((occupied + low, counts[occupied].astype(np.int64)))
            low, high = agreed.dists[position, :2]
            sketch = LogSketch(count=int(count), zeros=int(zeros), nan=int(nan), posinf=int(posinf),
                               neginf=int(neginf), min=float(low), max=float(high), sum=float(total),
                               sum_squares=float(squares), positive=stores[0], negative=stores[1])
            setattr(param, label, Distribution(sketch, int(eps) if eps_known == present else None))
        notes = list(self.report.notes)
        for group, (lr_low, lr_high, step_low, step_high) in zip(self.report.groups, agreed.groups):
            if not (_same(lr_low, lr_high) and _same(step_low, step_high)):
                notes.append(f"group {group.name}: the ranks used lr from {lr_low:g} to {lr_high:g} and "
                             f"step size from {step_low:g} to {step_high:g}; the report shows this "
                             "rank's")
        notes.append(f"whole model: merged from {self.world} ranks")
        groups = [_whole_group(group, params) for group, params in zip(self.report.groups, merged)]
        return _whole_report(self.report, groups, notes)


@dataclass
class Agreed:
    """What the MIN all-reduce of ``PackedStep.extremes`` established, alike on every rank:
    whether the layout must grow (``stale``), the ranks that could not measure
    (``missing``), each group's lr and step size lowest and highest, each distribution's
    min and max (and key spans), and from those where its bucket counts go in ``sums``."""

    stale: bool
    missing: list[int]
    groups: np.ndarray  # per group: lr low, high, step size low, high
    dists: np.ndarray  # per distribution: min, max, and per sign the first and last key
    spans: list[list[tuple[int, int]]] = field(init=False)  # per distribution, per sign: (first key, offset)
    sizes: list[list[int]] = field(init=False)
    buckets: int = field(init=False)

    def __post_init__(self) -> None:
        self.spans, self.sizes, offset = [], [], 0
        for row in self.dists:
            spans, sizes = [], []
            for low, high in (row[2:4], row[4:6]):
                size = int(high - low) + 1 if low <= high else 0
                spans.append((int(low) if size else 0, offset))
                sizes.append(size)
                offset += size
            self.spans.append(spans)
            self.sizes.append(sizes)
        self.buckets = offset


def merge_logs(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike) -> int:
    """Merge the per-rank JSONL logs of ``run_dirs`` (one directory per rank, each holding
    ``lrscope.jsonl`` written with per-tensor sketches) into ``out/lrscope.jsonl``: one
    record per (optimizer, step) present in every rank's log.  Returns the number of
    records written.  Only tensors whose records carry their sketch can be merged; a rank
    log written with ``tensor_sketches=False`` is refused (ValueError)."""
    from lrscope.logs import read_jsonl
    from lrscope.sinks.jsonl import FILE_NAME, JsonlSink

    per_rank: list[dict[tuple[Any, int], StepReport]] = []
    for run_dir in run_dirs:
        path = Path(run_dir) / FILE_NAME if Path(run_dir).is_dir() else Path(run_dir)
        if not path.is_file():
            raise ValueError(f"lrscope: no lrscope log in {run_dir} (expected {path})")
        records: dict[tuple[Any, int], StepReport] = {}
        for record in read_jsonl(path):
            report = StepReport.from_dict(record)
            records[(report.name or report.optimizer, report.t)] = report  # a restart: the latest
        per_rank.append(records)
    keys = [key for key in per_rank[0] if all(key in ranks for ranks in per_rank[1:])]
    Path(out).mkdir(parents=True, exist_ok=True)
    sink = JsonlSink(Path(out) / FILE_NAME)
    try:
        for key in keys:
            sink.write(merge_reports([ranks[key] for ranks in per_rank],
                                     notes=[f"merged from {len(per_rank)} rank logs by lrscope merge"]))
    finally:
        sink.close()
    return len(keys)


def register(subparsers: Any) -> None:
    """``lrscope merge RUN_DIRS... --out DIR`` (see ``lrscope.cli``)."""
    parser = subparsers.add_parser(
        "merge", help="merge per-rank lrscope logs into one whole-model log",
        description="Merge the lrscope.jsonl logs that the ranks of one distributed run wrote "
                    "each for itself (lrscope.watch(..., distributed=False)) into one log of the "
                    "whole model, which lrscope plot and lrscope check read: tensors' shards "
                    "merged exactly, copies counted once. Steps missing from a rank's log are "
                    "left out.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="one log directory per rank")
    parser.add_argument("--out", required=True, help="directory to write lrscope.jsonl into")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    if len(args.run_dirs) < 2:
        raise ValueError("give the log directories of at least two ranks")
    out = Path(args.out) / "lrscope.jsonl"
    if out.exists():
        raise ValueError(f"{out} exists already: choose another --out")
    written = merge_logs(args.run_dirs, args.out)
    print(f"wrote {out} ({written} steps merged from {len(args.run_dirs)} rank logs)")
    return 0
