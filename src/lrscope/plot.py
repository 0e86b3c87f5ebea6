"""``lrscope plot LOGDIR --png F``: one figure from lrscope's JSONL or TensorBoard logs.

The figure has five panels, one colour per parameter group:

* scheduled ``lr`` (dashed) against the step size really taken ``alpha_t`` (solid),
  and their ratio alpha_t / lr, on a log step axis so that the bias-correction dip of
  the first steps is visible;
* the effective learning rate per element, eta: median with p25-p75 and p05-p95 bands,
  and the medians of the tensors with the lowest and highest median (``|update|`` for
  optimizers measured empirically);
* ``eps_dominated``, the share of elements whose denominator is mostly eps, and the
  tensor with the largest share;
* ``update_to_param`` = ||delta theta|| / ||theta||, with the folklore 1e-3 line and the
  tensors moving least and most.

lrscope's own ``lrscope.jsonl`` is preferred; otherwise the TensorBoard event files in
LOGDIR are read (tags ``lr-<Optimizer>/<group>/<metric>`` as lrscope writes them; the
extreme tensors need the TensorBoard sink's ``params=True``).

>>> import tempfile, numpy as np
>>> from pathlib import Path
>>> from lrscope.report import Distribution, GroupReport, ParamReport, StepReport
>>> from lrscope.sinks.jsonl import JsonlSink
>>> log_dir = Path(tempfile.mkdtemp())
>>> sink = JsonlSink(log_dir / "lrscope.jsonl")
>>> for t in range(1, 4):
...     p = ParamReport(name="w", shape=(3,), update_norm=1e-3, param_norm=1.0,
...                     effective_lr=Distribution.from_array(np.array([1e-4, 2e-4, 4e-4]), 0))
...     sink.write(StepReport(t=t, optimizer="Adam", framework="torch", family="adam",
...         groups=[GroupReport.combine({"w": p}, name="pg0", lr=1e-3, step_size=3e-4)]))
>>> sink.close()
>>> run = load(log_dir)
>>> run.groups["lr-Adam/pg0"]["step_size"].values.tolist()
[0.0003, 0.0003, 0.0003]
>>> draw(run, log_dir / "lrscope.png")
>>> (log_dir / "lrscope.png").stat().st_size > 0
True
"""

from __future__ import annotations

import argparse
import os
import sys
import types
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from lrscope._optional import require
from lrscope.report import tag_prefix
from lrscope.sinks.jsonl import FILE_NAME as JSONL_FILE_NAME
from lrscope.logs import read_jsonl

#: Folklore healthy update:data ratio per step (see the README).
HEALTHY_UPDATE_TO_PARAM = 1e-3
_DISTRIBUTIONS = ("effective_lr", "update_magnitude")
#: (group key ``lr-<Optimizer>/<group>``, tensor name or None for the group, metric, step, value)
Point = tuple[str, str | None, str, int, float | None]


@dataclass
class Series:
    """One metric over the steps where it was logged."""

    steps: np.ndarray
    values: np.ndarray


@dataclass
class Run:
    """What a log directory holds, keyed like the TensorBoard tags.

    ``groups["lr-Adam/pg0"]["effective_lr/p50"]`` and
    ``params["lr-Adam/pg0"]["0.weight"]["update_to_param"]`` are Series.
    """

    source: str
    groups: dict[str, dict[str, Series]] = field(default_factory=dict)
    params: dict[str, dict[str, dict[str, Series]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _collect(points: Iterable[Point], source: str) -> Run:
    """A Run from ``(group_key, param or None, metric, step, value)`` tuples."""
    group_data: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    param_data: dict[str, dict[str, dict[str, list]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    for group, param, metric, step, value in points:
        if value is None:
            continue
        target = group_data[group] if param is None else param_data[group][param]
        target[metric].append((step, float(value)))

    def series(pairs: list[tuple[int, float]]) -> Series:
        steps, values = zip(*sorted(pairs))
        return Series(np.asarray(steps), np.asarray(values))

    run = Run(source=source)
    for group, metrics in group_data.items():
        run.groups[group] = {m: series(p) for m, p in metrics.items()}
    for group, params in param_data.items():
        run.params[group] = {n: {m: series(p) for m, p in ms.items()} for n, ms in params.items()}
    return run


#: (series prefix ``lr-<Optimizer or name>``, the last t logged, the lower t that followed it)
Restart = tuple[str, int, int]


def latest_records(records: Iterable[dict[str, Any]], restarts: list[Restart]) -> list[tuple[str, int, dict]]:
    """``(series prefix, t, record)`` of the steps taken (GradScaler's skipped ones left out),
    with TensorBoard's rule for a step counter that goes back: when t of a series returns to
    a t it already logged (the script run again with the same log_dir, or resumed from an
    earlier checkpoint), the later records replace the earlier ones from that t on.  Each
    such restart is appended to ``restarts``.

    >>> restarts = []
    >>> kept = latest_records([{"t": t, "optimizer": "Adam"} for t in (1, 2, 3, 1, 2)], restarts)
    >>> [t for _, t, _ in kept], restarts
    ([1, 2], [('lr-Adam', 3, 1)])
    """
    series: dict[str, list[tuple[str, int, dict]]] = defaultdict(list)  # each in increasing t
    for record in records:
        if record.get("skipped"):
            continue
        prefix, t = tag_prefix(record["optimizer"], record.get("name")), int(record["t"])
        kept = series[prefix]
        if kept and t <= kept[-1][1]:
            restarts.append((prefix, kept[-1][1], t))
            while kept and kept[-1][1] >= t:
                kept.pop()
        kept.append((prefix, t, record))
    return [item for kept in series.values() for item in kept]


def restart_notes(restarts: list[Restart]) -> list[str]:
    """One note per series that went back (however often: processes writing to one log_dir
    at once would otherwise give one per step).

    >>> restart_notes([("lr-Adam", 5, 1), ("lr-Adam", 5, 4)])
    ['lr-Adam: t went back 2 times, first from 5 to 1 (a new run in the same log_dir, or one resumed from an earlier checkpoint): the records written later replace the earlier ones from that t on']
    """
    by_series: dict[str, list[Restart]] = defaultdict(list)
    for restart in restarts:
        by_series[restart[0]].append(restart)
    notes = []
    for prefix, [(_, last, t), *more] in by_series.items():
        times = f" {len(more) + 1} times, first" if more else ""
        notes.append(f"{prefix}: t went back{times} from {last} to {t} (a new run in the same "
                     "log_dir, or one resumed from an earlier checkpoint): the records written "
                     "later replace the earlier ones from that t on")
    return notes


def _jsonl_points(path: Path, restarts: list[Restart]) -> Iterator[Point]:
    for prefix, t, record in latest_records(read_jsonl(path), restarts):
        for group in record["groups"]:
            key = f"{prefix}/{group['name']}"
            for metric in ("lr", "step_size", "weight_decay_rate", "update_to_param"):
                yield key, None, metric, t, group.get(metric)
            for name, value in (group.get("extra") or {}).items():
                yield key, None, name, t, value
            for param, entry in [(None, group), *group.get("params", {}).items()]:
                if param is not None:
                    yield key, param, "update_to_param", t, entry.get("update_to_param")
                for label in _DISTRIBUTIONS:
                    summary = entry.get(label) or {}
                    for stat, value in summary.items():
                        if stat == "eps_dominated":
                            yield key, param, stat, t, value
                        elif stat != "sketch":
                            yield key, param, f"{label}/{stat}", t, value


def _split_tag(tag: str) -> tuple[str, str | None, str] | None:
    """Split a tag into (group key, tensor or None, metric); None for other tags.

    >>> _split_tag("lr-Adam/pg0/dense/kernel/effective_lr/p50")
    ('lr-Adam/pg0', 'dense/kernel', 'effective_lr/p50')
    >>> _split_tag("lr-NAdam/pg1/step_size_grad"), _split_tag("loss")
    (('lr-NAdam/pg1', None, 'step_size_grad'), None)
    """
    parts = tag.split("/")
    if len(parts) < 3 or not parts[0].startswith("lr-"):
        return None
    key, rest = "/".join(parts[:2]), parts[2:]
    metric_length = 2 if len(rest) >= 2 and rest[-2] in _DISTRIBUTIONS else 1
    param = "/".join(rest[:-metric_length]) or None
    return key, param, "/".join(rest[-metric_length:])


def _event_points(directory: Path, restarts: list[Restart]) -> list[Point]:
    """The lrscope scalars of the event files in ``directory``, one file (one process) after
    the other in the order they were created, with ``latest_records``' rule: a file whose
    steps of a series start at or below steps already read replaces them from there on."""
    kept: list[Point] = []
    for path in sorted(directory.glob("*tfevents*")):  # the names start with the creation time
        points = list(_file_points(path))
        first: dict[str, int] = {}
        for key, _, _, step, _ in points:
            prefix = key.split("/", 1)[0]
            first[prefix] = min(first.get(prefix, step), step)
        for prefix, t in first.items():
            earlier = [step for key, _, _, step, _ in kept if key.split("/", 1)[0] == prefix]
            if earlier and t <= max(earlier):
                restarts.append((prefix, max(earlier), t))
                kept = [p for p in kept if p[0].split("/", 1)[0] != prefix or p[3] < t]
        kept += points
    return kept


def _file_points(path: Path) -> Iterator[Point]:
    require("tensorboard", "tensorboard")
    if "tensorflow" not in sys.modules:
        # TensorBoard would import all of TensorFlow (seconds, and log noise) just to read
        # records; this marker module is how TensorBoard's own no-TF build selects its stub.
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path), size_guidance={"scalars": 0}).Reload()
    for tag in events.Tags().get("scalars", []):
        parsed = _split_tag(tag)
        if parsed is not None:
            for event in events.Scalars(tag):
                yield (*parsed, int(event.step), event.value)


def load(log_dir: str | os.PathLike) -> Run:
    """Read ``lrscope.jsonl`` (or a given .jsonl file), else TensorBoard event files.

    Raises ValueError, in one line, when there is no lrscope data.
    """
    path = Path(log_dir)
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    candidates = [path] if path.is_file() else [path / JSONL_FILE_NAME, *sorted(path.glob("*.jsonl"))]
    for candidate in candidates:
        if candidate.is_file() and candidate.suffix == ".jsonl":
            restarts: list[Restart] = []
            run = _collect(_jsonl_points(candidate, restarts), str(candidate))
            if run.groups:
                run.notes = restart_notes(restarts)
                return run
    if path.is_dir() and any(path.glob("*tfevents*")):
        restarts = []
        run = _collect(_event_points(path, restarts), f"{path} (TensorBoard)")
        if run.groups:
            run.notes = restart_notes(restarts)
            return run
    raise ValueError(
        f"no lrscope data in {path}: expected {JSONL_FILE_NAME} or TensorBoard event files with "
        "lr-<Optimizer>/<group>/... tags, as written by lrscope.watch(..., log_dir=...)")


def _ranked(run: Run, metric: str) -> list[tuple[str, Series]]:
    """Tensors of all groups with a positive final ``metric``, smallest final value first."""
    final = [(s.values[-1], name, s) for params in run.params.values() for name, ms in params.items()
             if (s := ms.get(metric)) is not None and s.values.size and np.isfinite(s.values[-1])
             and s.values[-1] > 0]
    return [(name, series) for _, name, series in sorted(final, key=lambda item: item[0])]


def _extremes(run: Run, metric: str) -> list[tuple[str, Series]]:
    """The tensors with the lowest and highest final ``metric``, if there are two or more."""
    ranked = _ranked(run, metric)
    if len(ranked) < 2:
        return []
    return [(f"lowest: {ranked[0][0]}", ranked[0][1]), (f"highest: {ranked[-1][0]}", ranked[-1][1])]


def _plot(ax: Any, series: Series | None, **style: Any) -> bool:
    if series is None or not series.values.size:
        return False
    ax.plot(series.steps, series.values, **style)
    return True


def _same(a: Series | None, b: Series | None) -> bool:
    return a is not None and b is not None and np.array_equal(a.steps, b.steps) and np.allclose(
        a.values, b.values, rtol=1e-12, atol=0)


def _schedule_groups(run: Run) -> list[tuple[str, dict[str, Series]]]:
    """Groups with distinct lr/step_size curves (identical ones are drawn once)."""
    distinct: list[tuple[str, dict[str, Series]]] = []
    for key, metrics in sorted(run.groups.items()):
        for index, (other_key, other) in enumerate(distinct):
            if all(_same(metrics.get(m), other.get(m)) for m in ("lr", "step_size")):
                distinct[index] = (f"{other_key}, {key}", other)
                break
        else:
            distinct.append((key, metrics))
    return distinct


def _label(run: Run, key: str) -> str:
    """Group keys without the ``lr-<Optimizer>/`` prefix when there is one optimizer."""
    optimizers = {k.split("/", 1)[0] for k in run.groups}
    if len(optimizers) > 1:
        return key
    return ", ".join(part.split("/", 1)[1] for part in key.split(", "))


def _draw_schedule(run: Run, ax_lr: Any, ax_ratio: Any, colours: list[str]) -> None:
    for index, (key, metrics) in enumerate(_schedule_groups(run)):
        colour, name = colours[index % len(colours)], _label(run, key)
        _plot(ax_lr, metrics.get("lr"), color=colour, linestyle="--", label=f"scheduled lr ({name})")
        _plot(ax_lr, metrics.get("step_size"), color=colour, label=f"step size alpha_t ({name})")
        lr, step = metrics.get("lr"), metrics.get("step_size")
        if lr is not None and step is not None and np.array_equal(lr.steps, step.steps):
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = Series(lr.steps, step.values / lr.values)
            _plot(ax_ratio, ratio, color=colour, label=name)
            valid = np.isfinite(ratio.values)
            low = int(np.nanargmin(np.where(valid, ratio.values, np.nan))) if valid.any() else 0
            if 0 < low < ratio.values.size - 1:  # a dip, as Adam's bias correction makes
                ax_ratio.annotate(f"min {ratio.values[low]:.2f} at step {ratio.steps[low]}",
                                  (ratio.steps[low], ratio.values[low]), textcoords="offset points",
                                  xytext=(8, -14), fontsize=8, color=colour)
    ax_lr.set(xscale="log", yscale="log", xlabel="step (log scale)", ylabel="learning rate",
              title="Scheduled lr vs step size alpha_t really taken")
    ax_ratio.set(xscale="log", xlabel="step (log scale)", ylabel="alpha_t / lr", ylim=(0, 1.05),
                 title="alpha_t / lr: the bias correction (1 = none)")
    ax_ratio.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")


def _draw_distributions(run: Run, ax_eta: Any, ax_eps: Any, ax_update: Any,
                        colours: list[str]) -> tuple[bool, bool, bool]:
    found = [False, False, False]
    label = "effective_lr"
    for index, (key, metrics) in enumerate(sorted(run.groups.items())):
        colour, name = colours[index % len(colours)], _label(run, key)
        label = next((d for d in _DISTRIBUTIONS if f"{d}/p50" in metrics), label)
        for low, high, alpha in (("p05", "p95", 0.12), ("p25", "p75", 0.25)):
            a, b = metrics.get(f"{label}/{low}"), metrics.get(f"{label}/{high}")
            if a is not None and b is not None and np.array_equal(a.steps, b.steps):
                ax_eta.fill_between(a.steps, a.values, b.values, color=colour, alpha=alpha, linewidth=0)
        found[0] |= _plot(ax_eta, metrics.get(f"{label}/p50"), color=colour, linewidth=2,
                          label=f"{name}: median, p25-p75, p05-p95")
        eps = metrics.get("eps_dominated")
        if eps is not None:
            found[1] |= _plot(ax_eps, Series(eps.steps, 100 * eps.values), color=colour, label=name)
        found[2] |= _plot(ax_update, metrics.get("update_to_param"), color=colour, linewidth=2,
                          label=name)
    for ax, metric in ((ax_eta, f"{label}/p50"), (ax_update, "update_to_param")):
        for (what, series), style in zip(_extremes(run, metric), (":", "-.")):
            _plot(ax, series, color="black", linestyle=style, linewidth=1, label=f"tensor {what}")
    worst_eps = _ranked(run, "eps_dominated")[-1:]
    for name, series in worst_eps:
        _plot(ax_eps, Series(series.steps, 100 * series.values), color="black", linestyle=":",
              linewidth=1, label=f"tensor highest: {name}")
    if label == "update_magnitude":
        what, title = "|update| per element", "Realized |update| per element (measured empirically)"
    else:
        what, title = "eta per element", "Effective learning rate: eta per element"
    ax_eta.set(yscale="log", xlabel="step", ylabel=what,
               title=f"{title} (median, p25-p75, p05-p95 of each group)")
    ax_eps.set(xlabel="step", ylabel="% of elements", ylim=(0, None),
               title="eps-dominated elements (eps > sqrt(v_hat): eta ~ lr/eps)")
    if found[2]:
        ax_update.axhline(HEALTHY_UPDATE_TO_PARAM, color="grey", linestyle="--", linewidth=1,
                          label="1e-3 (folklore healthy)")
    ax_update.set(yscale="log", xlabel="step", ylabel="||update|| / ||param||",
                  title="Update-to-parameter ratio per step")
    return found[0], found[1], found[2]


def draw(run: Run, png: str | os.PathLike) -> None:
    """Draw the figure of ``run`` to ``png``: schedule, eta bands, eps_dominated, update ratio."""
    require("matplotlib", "plot").use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(13, 11), layout="constrained")
    grid = fig.add_gridspec(3, 2, height_ratios=(1, 1.1, 1))
    ax_lr, ax_ratio = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    ax_eta = fig.add_subplot(grid[1, :])
    ax_eps, ax_update = fig.add_subplot(grid[2, 0]), fig.add_subplot(grid[2, 1])
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    _draw_schedule(run, ax_lr, ax_ratio, colours)
    has_eta, has_eps, has_update = _draw_distributions(run, ax_eta, ax_eps, ax_update, colours)
    for ax, has_data in ((ax_lr, True), (ax_ratio, True), (ax_eta, has_eta), (ax_eps, has_eps),
                         (ax_update, has_update)):
        ax.grid(True, which="major", alpha=0.3)
        if has_data:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "not in these logs", transform=ax.transAxes, ha="center",
                    va="center", color="grey")
    optimizers = sorted({key.split("/", 1)[0].removeprefix("lr-") for key in run.groups})
    fig.suptitle(f"lrscope: {', '.join(optimizers)}  -  {run.source}", fontsize=12)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    data = load(args.logdir)
    logdir = Path(args.logdir)
    png = Path(args.png) if args.png else (logdir if logdir.is_dir() else logdir.parent) / "lrscope.png"
    try:
        draw(data, png)
    except OSError as error:
        raise ValueError(f"cannot write {png}: {error.strerror or error}") from None
    for note in data.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {png}")
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plot", help="plot lr, alpha_t, eta bands, eps_dominated and update/param from logs",
        description="Draw one PNG from lrscope's lrscope.jsonl or TensorBoard event files.")
    parser.add_argument("logdir", help="the log_dir given to lrscope.watch (or a .jsonl file)")
    parser.add_argument("--png", help="output file (default: LOGDIR/lrscope.png)")
    parser.set_defaults(run=run)
