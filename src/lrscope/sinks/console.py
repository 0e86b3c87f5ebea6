"""Console sink: a compact table of the headline numbers every N steps, via rich.

One row per parameter group; the header repeats every ``header_every`` tables, so the
output stays aligned and readable in a plain log file (no colours, no box drawing when
the output is not a terminal)::

      step group          lr step_size  eta p05  eta p50  eta p95 eps_dom upd/param
         1 pg0      1.00e-03  3.16e-04 3.16e-04 3.16e-04 3.16e-04   0.00%  3.05e-04

``eta`` is the effective learning rate per element (``|dθ|`` for optimizers measured
empirically); its columns show ``-`` on steps without distributions, so choose ``every``
as a multiple of ``watch(every=...)``.  An lr or step size lrscope does not know (an
optimizer it does not model) shows ``n/a``.

>>> import io, numpy as np
>>> from rich.console import Console
>>> from lrscope.report import Distribution, GroupReport, StepReport
>>> out = io.StringIO()
>>> sink = ConsoleSink(every=10, console=Console(file=out, width=100))
>>> group = GroupReport(name="pg0", lr=1e-3, step_size=3.16e-4, weight_decay_rate=0.0,
...                     effective_lr=Distribution.from_array(np.full(4, 3.16e-4), 0))
>>> sink.write(StepReport(t=1, optimizer="Adam", framework="torch", family="adam",
...                       groups=[group]))
>>> print(out.getvalue().splitlines()[1].split())
['1', 'pg0', '1.00e-03', '3.16e-04', '3.16e-04', '3.16e-04', '3.16e-04', '0.00%', '-']
"""

from __future__ import annotations

import math
from typing import Any

from lrscope.report import Distribution, GroupReport, StepReport

def _number(value: float | None, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return f"{value:.2e}"


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}%"


class ConsoleSink:
    """Prints a table row per group on steps 1, 1 + every, 1 + 2*every, ...

    ``console`` is a ``rich.console.Console`` (e.g. a ``Progress``'s console, so rows
    print above a live progress bar); by default one on stdout, 120 columns wide when
    stdout is not a terminal.
    """

    def __init__(self, every: int = 100, *, console: Any = None, header_every: int = 20):
        if int(every) < 1:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        if console is None:
            from rich.console import Console

            console = Console()
            if not console.is_terminal:
                console = Console(width=120)
        self.every = int(every)
        self.console = console
        self.header_every = header_every
        self._tables = 0
        self._notes_seen: set[str] = set()

    def write(self, report: StepReport) -> None:
        for note in report.notes:
            if note not in self._notes_seen:
                self._notes_seen.add(note)
                self.console.print(f"lrscope note: {note}", style="dim", markup=False,
                                   highlight=False)
        for finding in report.findings:  # each once, at the step it first held
            self.console.print(f"lrscope {finding.line()}", markup=False, highlight=False,
                               style="bold" if finding.severity == "warning" else "dim")
        if (report.t - 1) % self.every and not report.skipped:
            return
        self.console.print(self._table(report))
        self._tables += 1

    def _table(self, report: StepReport) -> Any:
        from rich.table import Table

        table = Table(box=None, show_header=self._tables % self.header_every == 0,
                      padding=(0, 1), collapse_padding=True, pad_edge=False)
        label = "|dθ|" if report.empirical else "eta"
        table.add_column("step", justify="right", width=6)
        table.add_column("group", justify="left", width=8, overflow="ellipsis", no_wrap=True)
        for name in ("lr", "step_size", f"{label} p05", f"{label} p50", f"{label} p95"):
            table.add_column(name, justify="right", width=max(8, len(name)))
        table.add_column("eps_dom", justify="right", width=7)
        table.add_column("upd/param", justify="right", width=9)
        for group in report.groups:
            table.add_row(*self._row(report, group))
        return table

    @staticmethod
    def _row(report: StepReport, group: GroupReport) -> list[str]:
        dist: Distribution | None = group.effective_lr or group.update_magnitude
        quantiles = [dist.quantile(q) for q in (0.05, 0.5, 0.95)] if dist is not None else [None] * 3
        step = f"{report.t}" + (" skip" if report.skipped else "")
        where = group.name if report.name is None else f"{report.name}/{group.name}"
        return [step, where, _number(group.lr, "n/a"), _number(group.step_size, "n/a"),
                *map(_number, quantiles), _percent(dist.eps_dominated if dist else None),
                _number(group.update_to_param)]

    def close(self) -> None:
        """Nothing to flush: rows are printed as they come."""
