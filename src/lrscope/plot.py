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
extreme tensors need the TensorBoard sink's ``params=True``).  ``load`` (from
``lrscope.plot_data``) skips what is malformed, with notes, and downsamples long runs while
reading; the PNG goes only where asked (``lrscope._outputs``).

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
from pathlib import Path
from typing import IO, Any

import numpy as np

from lrscope._optional import require
from lrscope._outputs import output_path, write_replacing
from lrscope.plot_data import DISTRIBUTIONS, RATIO, Run, Series, load, restart_notes

__all__ = ["Run", "Series", "draw", "load", "register", "restart_notes", "run"]

#: Folklore healthy update:data ratio per step (see the README).
HEALTHY_UPDATE_TO_PARAM = 1e-3

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


def _aligned(a: Series, b: Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(steps, a, b)`` on the steps of both: downsampled separately, a band's two edges
    kept different steps (each its own extremes); between them, each edge is interpolated."""
    if np.array_equal(a.steps, b.steps):
        return a.steps, a.values, b.values
    steps = np.union1d(a.steps, b.steps)
    return steps, np.interp(steps, a.steps, a.values), np.interp(steps, b.steps, b.values)


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
        ratio = metrics.get(RATIO)
        if ratio is not None and ratio.values.size:
            _plot(ax_ratio, ratio, color=colour, label=name)
            low = int(np.argmin(ratio.values))
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
        label = next((d for d in DISTRIBUTIONS if f"{d}/p50" in metrics), label)
        for low, high, alpha in (("p05", "p95", 0.12), ("p25", "p75", 0.25)):
            a, b = metrics.get(f"{label}/{low}"), metrics.get(f"{label}/{high}")
            if a is not None and b is not None:
                ax_eta.fill_between(*_aligned(a, b), color=colour, alpha=alpha, linewidth=0)
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


def draw(run: Run, png: str | os.PathLike | IO[bytes]) -> None:
    """Draw the figure of ``run`` to ``png`` (a path, written as PNG whatever its suffix, or
    a binary file): schedule, eta bands, eps_dominated, update ratio."""
    require("matplotlib", "plot").use("Agg")
    import matplotlib.pyplot as plt

    # Fixed margins, not layout="constrained": the panels' labels are known, and the layout
    # engine would draw the whole figure once more to measure them (0.8 s of a 2.5 s draw).
    fig = plt.figure(figsize=(13, 11))
    grid = fig.add_gridspec(3, 2, height_ratios=(1, 1.1, 1), left=0.06, right=0.98, bottom=0.05,
                            top=0.94, hspace=0.3, wspace=0.18)
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
    try:
        fig.savefig(png, dpi=100, format="png")
    finally:
        plt.close(fig)


def run(args: argparse.Namespace) -> int:
    logdir = Path(args.logdir)
    default = (logdir if logdir.is_dir() else logdir.parent) / "lrscope.png"
    png = output_path(args.png, default=default, suffix=".png", in_directory="lrscope.png")
    data = load(logdir)
    write_replacing(png, lambda handle: draw(data, handle))
    for note in data.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {png}")
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plot", help="plot lr, alpha_t, eta bands, eps_dominated and update/param from logs",
        description="Draw one PNG from lrscope's lrscope.jsonl or TensorBoard event files. "
        "Malformed lines, event files cut short and entries that are not regular files are "
        "skipped, with one note each on stderr; long logs are downsampled while reading "
        "(every step's extremes kept), so memory does not grow with the run.")
    parser.add_argument("logdir", help="the log_dir given to lrscope.watch (or a .jsonl file)")
    parser.add_argument(
        "--png", metavar="PATH",
        help="where to write the PNG (default: LOGDIR/lrscope.png, or beside a .jsonl file). "
        "A directory means DIR/lrscope.png; a path without suffix is written as given; another "
        "suffix than .png is refused. An existing file is replaced (written to a temporary "
        "file beside it, then renamed); a symbolic link there is refused, never written through.")
    parser.set_defaults(run=run)
