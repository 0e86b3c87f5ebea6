"""``lrscope curve``: the data-independent step size alpha_t, as a table, CSV or PNG.

    lrscope curve adam --lr 1e-3 --steps 10000 --schedule cosine --warmup 500 \\
        --framework torch,keras --csv adam.csv --png adam.png
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

from lrscope import formulas, schedules
from lrscope._outputs import output_path, write_replacing
from lrscope.downsample import Downsampled
from lrscope.formulas import CONVENTIONS

#: Steps shown in the table (those <= --steps, plus the last one).
TABLE_STEPS = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000,
               50_000, 100_000, 200_000, 500_000, 1_000_000)
#: The longest curve: it is computed step by step (the dip and where alpha_t reaches 99 % of
#: lr are searched for in every step), a million steps a second or so.
MAX_STEPS = 10**9
#: Steps computed at once: the CSV is written, and the table, the facts and the PNG's
#: downsampled lines are taken, a chunk at a time, so memory does not grow with --steps.
CHUNK = 1 << 18


@dataclass
class Curve:
    """One framework's curve over some steps: the lr each step used and every step-size term."""

    framework: str
    lr: np.ndarray
    terms: dict[str, np.ndarray]

    @property
    def step_size(self) -> np.ndarray:
        return self.terms["step_size"]


@dataclass
class _Setup:
    """What one framework's curve is computed from."""

    framework: str
    module: Any
    hyper: dict[str, Any]
    schedule: schedules.Schedule


def _hyper(args: argparse.Namespace) -> dict[str, Any]:
    hyper: dict[str, Any] = {}
    if args.betas is not None:
        hyper["betas"] = tuple(args.betas)
    if args.eps is not None:
        hyper["eps"] = args.eps
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        hyper[key] = _parse_value(item, value)
    return hyper


def _parse_value(item: str, text: str) -> Any:
    """true/false, a number, or numbers separated by commas (``betas=0.9,0.99``)."""
    if "," in text:
        return tuple(_parse_value(item, part) for part in text.split(","))
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        number = int(text)
        return number if abs(number) < 2**63 else float(number)
    except OverflowError:
        return math.inf if number > 0 else -math.inf
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--set {item}: the value must be a number, true or false, or numbers "
                         "separated by commas") from None


def _check_options(args: argparse.Namespace) -> None:
    """One-line errors for options no curve can use."""
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.steps > MAX_STEPS:
        raise ValueError(f"--steps must be <= {MAX_STEPS}, got {args.steps} (the curve is "
                         "computed step by step)")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.warmup > MAX_STEPS:
        raise ValueError(f"--warmup must be <= {MAX_STEPS}, got {args.warmup}")
    if args.every < 1:
        raise ValueError(f"--every must be >= 1, got {args.every}")
    if not 0 < args.gamma < math.inf:
        raise ValueError(f"--gamma must be finite and > 0, got {args.gamma}")
    if not 0 <= args.min_lr < math.inf:
        raise ValueError(f"--min-lr must be finite and >= 0, got {args.min_lr}")


def _schedule(args: argparse.Namespace, lr: float) -> schedules.Schedule:
    name = args.schedule
    if name == "constant":
        return schedules.constant(lr)
    if name == "step":  # decays every --every steps: none at all past the last step
        return schedules.step(lr, every=min(args.every, args.steps), gamma=args.gamma)
    if name == "exponential":
        return schedules.exponential(lr, gamma=args.gamma)
    if name == "warmup":
        return schedules.warmup(lr, warmup=args.warmup)
    if name == "cosine":
        return schedules.cosine(lr, steps=args.steps, warmup=args.warmup, min_lr=args.min_lr)
    return schedules.onecycle(lr, steps=args.steps)


def setups(args: argparse.Namespace) -> list[_Setup]:
    """One setup per requested framework (each with its own default lr unless --lr), every
    option checked first."""
    _check_options(args)
    frameworks = [f.strip() for f in args.framework.split(",") if f.strip()]
    unknown = [f for f in frameworks if f not in CONVENTIONS]
    if unknown or not frameworks:
        raise ValueError(f"unknown framework {unknown}; choose from {', '.join(CONVENTIONS)}")
    module = formulas.family(args.optimizer)
    missing = [f for f in frameworks if f not in module.DEFAULTS]
    if missing:
        raise ValueError(
            f"{args.optimizer!r} does not exist in {', '.join(missing)}; "
            f"it exists in {', '.join(c for c in CONVENTIONS if c in module.DEFAULTS)}"
        )
    hyper = _hyper(args)
    result = []
    for framework in frameworks:
        given = {**hyper, **({"lr": args.lr} if args.lr is not None else {})}
        h = formulas.checked(formulas.hyperparameters(args.optimizer, framework, **given))
        try:
            lr = float(h["lr"])
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"lr must be a number, got {h['lr']!r}") from None
        result.append(_Setup(framework, module, h, _schedule(args, lr)))
    return result


def curves(setups: list[_Setup], t: np.ndarray) -> list[Curve]:
    """Each setup's curve at steps ``t``."""
    out = []
    for setup in setups:
        h = {**setup.hyper, "lr": schedules.evaluate(setup.schedule, t - 1)}
        with np.errstate(all="ignore"):  # a hyperparameter out of range gives NaN, as it says
            try:
                terms = setup.module.step_sizes(np, t, h, setup.framework)
            except (TypeError, ValueError, OverflowError, ZeroDivisionError) as error:
                raise ValueError(f"{setup.module.NAMES[0]} cannot use these hyperparameters: "
                                 f"{error}") from None
        out.append(Curve(setup.framework, h["lr"],
                         {k: np.broadcast_to(np.asarray(v, float), t.shape) for k, v in terms.items()}))
    return out


def chunks(setups: list[_Setup], steps: int, size: int | None = None) -> Iterator[tuple[np.ndarray, list[Curve]]]:
    """``(t, curves)`` for steps 1..``steps``, ``size`` (default CHUNK) steps at a time."""
    size = size or CHUNK
    for start in range(1, steps + 1, size):
        t = np.arange(start, min(start + size, steps + 1))
        yield t, curves(setups, t)


class _Facts:
    """What a user is after, gathered chunk by chunk: alpha_1/lr, the dip, when alpha_t
    reaches 99 % of lr (after the dip)."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.dip: tuple[float, int] | None = None  # the lowest ratio and its step
        self.reached: int | None = None  # the first step at or after the dip with ratio >= 0.99
        self.steps = 0

    def add(self, t: np.ndarray, curve: Curve) -> None:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = curve.step_size / curve.lr  # NaN where the schedule gives lr = 0
        if self.first is None:
            self.first = float(ratio[0])
        self.steps = int(t[-1])
        valid = ~np.isnan(ratio)
        if valid.any():
            low = int(np.nanargmin(ratio))
            if self.dip is None or ratio[low] < self.dip[0]:
                self.dip, self.reached = (float(ratio[low]), int(t[low])), None
                after = np.flatnonzero(ratio[low:] >= 0.99)
                if after.size:
                    self.reached = int(t[low + after[0]])
                return
        if self.dip is not None and self.reached is None:
            after = np.flatnonzero(ratio >= 0.99)
            if after.size:
                self.reached = int(t[after[0]])

    def lines(self) -> list[str]:
        lines = [f"alpha_1/lr = {self.first:.4g}"]
        if self.dip is None:
            return lines
        value, step = self.dip
        if 1 < step < self.steps:
            lines.append(f"dip: alpha_t/lr = {value:.4g} at t = {step}")
        if self.reached is not None:
            lines.append(f"alpha_t first reaches 99% of lr at t = {self.reached}")
        else:
            lines.append(f"alpha_t stays below 99% of lr for all {self.steps} steps")
        return lines


def _columns(curves: list[Curve], separator: str, table: bool,
             shared_lr: bool = False) -> list[tuple[str, np.ndarray]]:
    """The columns of the table (``separator`` " ") or of the CSV ("_"): the lr (once where
    every framework has the same, in the table), then each framework's terms, and in the
    table of one framework alpha_t / lr."""
    several = len(curves) > 1
    columns: list[tuple[str, np.ndarray]] = []
    for i, curve in enumerate(curves):
        suffix = f"{separator}{curve.framework}" if several else ""
        if not shared_lr or i == 0:
            columns.append((f"lr{suffix if not shared_lr else ''}", curve.lr))
        columns.extend((f"{term}{suffix}", values) for term, values in curve.terms.items())
        if table and not several:
            with np.errstate(divide="ignore", invalid="ignore"):
                columns.append(("step_size/lr", curve.step_size / curve.lr))
    return columns


class _Walk:
    """One pass over the curve, chunk by chunk: the CSV rows written as they come, the
    table's rows and each framework's facts gathered, the PNG's lines downsampled
    (``lrscope.downsample``: every step's extremes kept, a few thousand points a line)."""

    def __init__(self, args: argparse.Namespace, setups: list[_Setup], png: bool):
        self.setups, self.steps = setups, args.steps
        self.shown = sorted({s for s in TABLE_STEPS if s <= args.steps} | {args.steps})
        self.shared_lr = len({float(s.hyper["lr"]) for s in setups}) == 1
        self.names: list[str] = []
        self.rows: list[tuple[int, list[float]]] = []
        self.facts = [_Facts() for _ in setups]
        self.lines: dict[str, Downsampled] | None = {} if png else None

    def __call__(self, handle: IO[bytes] | None = None) -> None:
        text = None if handle is None else io.TextIOWrapper(handle, encoding="utf-8", newline="")
        writer = None if text is None else csv.writer(text)
        for t, curves in chunks(self.setups, self.steps):
            if writer is not None:
                columns = _columns(curves, "_", table=False)
                if t[0] == 1:
                    writer.writerow(["t"] + [name for name, _ in columns])
                for i in range(0, t.size, 8192):  # rows as Python objects: a few at a time
                    writer.writerows(zip(t[i:i + 8192].tolist(),
                                         *(values[i:i + 8192].tolist() for _, values in columns)))
            columns = _columns(curves, " ", table=True, shared_lr=self.shared_lr)
            self.names = [name for name, _ in columns]
            for s in self.shown:
                if t[0] <= s <= t[-1]:
                    self.rows.append((s, [float(values[s - t[0]]) for _, values in columns]))
            for gathered, curve in zip(self.facts, curves):
                gathered.add(t, curve)
            if self.lines is not None:
                for curve in curves:
                    label = f" ({curve.framework})" if len(curves) > 1 else ""
                    for name, values in [(f"scheduled lr{label}", curve.lr),
                                         *((f"{term}{label}", v) for term, v in curve.terms.items())]:
                        self.lines.setdefault(name, Downsampled()).extend(t, values)
        if text is not None:
            text.flush()
            text.detach()


def print_table(optimizer: str, walk: _Walk) -> None:
    """Well-chosen steps as rows; the lr once if shared, then each framework's terms."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{optimizer}: step size alpha_t per step t", title_justify="left")
    table.add_column("t", justify="right")
    for name in walk.names:
        table.add_column(name, justify="right")
    for s, values in walk.rows:
        table.add_row(str(s), *(f"{value:.4g}" for value in values))
    console = Console(width=max(100, 14 * len(walk.names) + 10))
    console.print(table)
    for setup, gathered in zip(walk.setups, walk.facts):
        console.print(f"[bold]{setup.framework}[/bold]: " + "; ".join(gathered.lines()), soft_wrap=True)


def draw_png(handle: IO[bytes], optimizer: str, lines: dict[str, Downsampled]) -> None:
    """lr and alpha_t on one chart, log step axis."""
    from lrscope._optional import require

    require("matplotlib", "plot").use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for label, line in lines.items():
        ax.plot(*line.points(), linestyle="--" if label.startswith("scheduled lr") else "-",
                label=label)
    ax.set_xscale("log")
    ax.set_xlabel("step t")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{optimizer}: scheduled lr vs bias-corrected step size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    try:
        fig.savefig(handle, dpi=120, format="png")
    finally:
        plt.close(fig)


def run(args: argparse.Namespace) -> int:
    frameworks = setups(args)
    csv_path = None if args.csv is None else output_path(args.csv, default=Path(args.csv))
    png_path = None if args.png is None else output_path(args.png, default=Path(args.png), suffix=".png")
    walk = _Walk(args, frameworks, png=png_path is not None)
    if csv_path is not None:
        write_replacing(csv_path, walk)
    else:
        walk()
    print_table(args.optimizer, walk)
    if csv_path is not None:
        print(f"wrote {csv_path}")
    if png_path is not None and walk.lines is not None:
        lines = walk.lines
        write_replacing(png_path, lambda handle: draw_png(handle, args.optimizer, lines))
        print(f"wrote {png_path}")
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "curve", help="the data-independent step size alpha_t of an optimizer",
        description="Print (and save) the bias-corrected step size alpha_t, step by step. "
        f"Up to {MAX_STEPS:,} steps, computed {CHUNK:,} at a time: the CSV is written as they "
        "come and the PNG's lines are downsampled (every step's extremes kept), so memory does "
        "not grow with --steps.",
    )
    parser.add_argument("optimizer", help="adam, adamw, nadam, radam, adamax, sgd, adagrad, "
                        "rmsprop, adadelta, adafactor, lion, ...")
    parser.add_argument("--lr", type=float, help="base learning rate (default: the framework's)")
    parser.add_argument("--steps", type=int, default=10_000, help=f"steps, 1 to {MAX_STEPS:,}")
    parser.add_argument("--betas", type=float, nargs=2, metavar=("BETA1", "BETA2"))
    parser.add_argument("--eps", type=float)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="any other hyperparameter, e.g. --set momentum_decay=0.004 or "
                        "--set betas=0.9,0.99")
    parser.add_argument("--schedule", choices=sorted(schedules.BY_NAME), default="constant")
    parser.add_argument("--warmup", type=int, default=0, help="warmup steps (warmup, cosine)")
    parser.add_argument("--gamma", type=float, default=0.1, help="decay factor (step, exponential)")
    parser.add_argument("--every", type=int, default=1000, help="steps between decays (step)")
    parser.add_argument("--min-lr", type=float, default=0.0, help="final lr (cosine)")
    parser.add_argument("--framework", default="torch",
                        help=f"comma-separated conventions: {','.join(CONVENTIONS)}")
    _outputs_help = ("An existing file is replaced (written beside it, then renamed); a "
                     "symbolic link or a directory there is refused.")
    parser.add_argument("--csv", metavar="PATH", help="write one row per step to this CSV file. "
                        + _outputs_help)
    parser.add_argument("--png", metavar="PATH", help="draw lr and alpha_t to this PNG file "
                        "(a path without suffix is written as given, another suffix refused). "
                        + _outputs_help)
    parser.set_defaults(run=run)
