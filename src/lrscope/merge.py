"""Whole-model reports from the reports of several processes (the ranks of a distributed run).

Each rank measures only the elements it counts (its shards of a sharded tensor; a
replicated tensor on one rank only), so merging is a union with nothing counted twice:
tensors of the same name are one tensor in shards, whose sketches merge exactly (the
same buckets, counts added; min/max/mean and norms exact up to float rounding), and each
group's distribution is rebuilt from its tensors.  ``lrscope.watch`` does this live on
rank 0 (``lrscope.torch.distributed``); ``lrscope merge`` does it offline from per-rank
JSONL logs (``merge_logs``).

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
from pathlib import Path
from typing import Any, Iterable, Sequence

from lrscope.report import Distribution, GroupReport, ParamReport, StepReport


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
        groups.append(GroupReport.combine(
            params, name=group.name, lr=group.lr, step_size=group.step_size,
            weight_decay_rate=group.weight_decay_rate, extra=dict(group.extra),
            lr_source=group.lr_source))
    return StepReport(t=first.t, optimizer=first.optimizer, framework=first.framework,
                      family=first.family, groups=groups, skipped=first.skipped,
                      empirical=first.empirical, notes=merged_notes, name=first.name)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0)


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
